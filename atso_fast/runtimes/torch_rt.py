"""PyTorch runtime: eager or ``torch.compile``, float32/float16/bfloat16."""

from __future__ import annotations

import copy
import time
import warnings
from contextlib import contextmanager
from typing import Any

import numpy as np

from atso_fast.io.files import read_regular_file
from atso_fast.io.pt2 import load_torch_program
from atso_fast.runtimes.base import (
    FixedRuntime,
    RuntimeUnavailable,
    check_device,
    check_precision,
)

__all__ = ["TorchRuntime"]


@contextmanager
def _eval_mode(module: Any):
    """Eval mode for the call, then the caller's mode back (a live module may be training)."""
    was_training = getattr(module, "training", False)
    try:
        module.eval()
    except NotImplementedError:  # torch.export programs are inference-only and refuse .eval()
        was_training = False
    try:
        yield
    finally:
        if was_training:
            module.train()


@contextmanager
def torch_threads(n: int | None):
    """torch's intra-op CPU threads set to ``n`` inside the block, the previous count restored
    (``None`` or 0: unchanged). Shared by the runtime and the training CLI's ``--threads``."""
    import torch

    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _channels_last(ndim: int) -> Any:
    """torch's channels-last memory format for the window rank (4: 2D, 5: 3D), or None."""
    import torch

    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim)


class TorchRuntime(FixedRuntime):
    """Runs a torch module. float16 needs CUDA; bfloat16 runs on both (autocast-free casts).

    ``channels_last`` runs convolutions in torch's channels-last layout. On CPU it is often
    oneDNN's fastest path (MONAI UNet, 4 x 64^3 windows, 2 cores: 0.165 s vs 0.197 s) but not
    always: outputs must come back in C order for our kernels, and for a 1 -> 105 channel conv
    head that copy alone costs ~0.55 s (0.77 s vs 0.38 s in all). So the default (``None``) on
    CPU runs its first full batches (``probe_batch`` windows; smaller ones run contiguous and do
    not count) in both layouts and keeps the faster (``layout_probe`` holds the times; see
    ``_probe``); on CUDA the default is off. A batch of 1 is no guide: oneDNN picks other kernels
    for it.
    """

    name = "torch"

    def __init__(
        self,
        module: Any,
        *,
        device: str = "cpu",
        precision: str = "float32",
        compile: bool = False,
        channels_last: bool | None = None,
        probe_batch: int = 1,
        threads: int | None = None,
    ):
        import torch

        self.device = check_device(device)
        self.precision = check_precision(precision)
        if precision == "float16" and not device.startswith("cuda"):
            raise ValueError("precision float16 needs device cuda (use bfloat16 or float32 on cpu)")
        self._dtype = getattr(torch, precision)
        on_cuda = self.device.startswith("cuda")
        self.channels_last = (False if on_cuda else None) if channels_last is None else bool(channels_last)
        self.layout_probe: dict[str, float] | None = None
        self._probe_step = 0
        self._probe_times: dict[str, float] = {}
        self.probe_batch = max(int(probe_batch), 1)
        # CPU threads per call (None: torch's own setting); a Ray actor passes its CPU share
        self.threads = None if on_cuda or threads is None else max(int(threads), 1)
        param = next(iter(module.parameters()), None)
        if param is not None and (
            param.dtype != self._dtype or param.device != torch.device(device) or self.channels_last is not False
        ):
            with warnings.catch_warnings():  # torch's LeafSpec deprecation when copying a torch.export module
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")
                module = copy.deepcopy(module)  # never convert the caller's module in place
        self.module = module.to(device=device, dtype=self._dtype)
        self._layout_ndim = 0  # rank whose memory format the weights are in
        self.compiled = bool(compile)
        self._batch = self.probe_batch if compile else 0  # batch size the compiled graph is specialised to
        self._fn = torch.compile(self.module, dynamic=False) if compile else self.module

    def _layout(self, x: Any) -> Any:
        """``x`` (and, once, the weights) in channels-last format when that layout is on."""
        fmt = _channels_last(x.dim()) if self.channels_last else None
        if fmt is None:
            return x
        if self._layout_ndim != x.dim():  # weights follow the input rank (2D or 3D nets)
            self.module.to(memory_format=fmt)
            self._layout_ndim = x.dim()
        return x.contiguous(memory_format=fmt)

    def _probe(self, x: Any) -> Any:
        """One of the first four full CPU batches; returns its output (no extra compute).

        Batch 1 runs contiguous and batch 2 channels-last, untimed: each layout's first call
        pays one-off costs (allocations, oneDNN primitives and weight reorders) that would bias
        a single timing (measured: the MONAI UNet looked even when channels-last is 15% faster).
        Batch 3 runs channels-last and batch 4 contiguous, timed, the weight conversions kept
        outside the timings; channels-last is timed with the copy back to C order it needs.
        """
        import torch

        step = self._probe_step
        self._probe_step += 1
        fmt = _channels_last(x.dim())
        if fmt is None:  # a rank without a channels-last format: nothing to choose
            self.channels_last = False
            return self.module(x)
        if step in (1, 2):
            if step == 1:
                self.module.to(memory_format=fmt)
            t0 = time.perf_counter()
            out = self.module(x.contiguous(memory_format=fmt)).contiguous()
            self._probe_times["channels_last_s"] = time.perf_counter() - t0
            return out
        if step == 3:
            self.module.to(memory_format=torch.contiguous_format)
        t0 = time.perf_counter()
        out = self.module(x)
        if step == 3:
            self.layout_probe = {**self._probe_times, "contiguous_s": time.perf_counter() - t0}
            self.channels_last = self.layout_probe["channels_last_s"] < self.layout_probe["contiguous_s"]
            self._layout_ndim = 0  # _layout converts the weights again if channels-last won
        return out

    def _pad_batch(self, x: Any) -> Any:
        """Zero-pad short batches (a volume's last one) to the compiled batch size.

        A compiled graph is specialised to one batch size; padding costs a few windows of
        compute, a recompile for every remainder size costs tens of seconds on CPU.
        """
        import torch

        if not self.compiled or x.shape[0] >= self._batch:
            self._batch = max(self._batch, x.shape[0])
            return x
        return torch.cat([x, x.new_zeros((self._batch - x.shape[0], *x.shape[1:]))])

    @classmethod
    def create(cls, *, package: Any = None, module: Any = None, **kw) -> TorchRuntime:
        if module is None:
            module = cls._load_program(package)
        return cls(module, **kw)

    @staticmethod
    def _load_program(package: Any) -> Any:
        if package is None or package.root is None or not package.torch_file:
            raise RuntimeUnavailable(
                "this model package has no torch program (model.pt2); use runtime "
                "'onnxruntime' or re-export with atso_fast.export_model"
            )
        path = package.root / package.torch_file
        if not path.is_file():
            raise RuntimeUnavailable(f"{path}: torch program named in model.json not found")
        data = package.torch_bytes() if hasattr(package, "torch_bytes") else read_regular_file(path)
        # untrusted: checked for anything that runs code, then loaded from the checked bytes
        return load_torch_program(data, str(path)).module()

    def __call__(self, batch: Any) -> Any:
        import torch

        on_host = isinstance(batch, np.ndarray)
        x = torch.from_numpy(batch) if on_host else batch
        n = x.shape[0]
        x = self._pad_batch(x.to(device=self.device, dtype=self._dtype, non_blocking=True))
        with torch.inference_mode(), _eval_mode(self.module), torch_threads(self.threads):
            if self.channels_last is None and x.shape[0] >= self.probe_batch:
                out = self._probe(x)[:n]
            else:
                out = self._fn(self._layout(x))[:n]
        # The kernels take float32/float16 windows, and bfloat16 ones from the host (handed over
        # as ml_dtypes.bfloat16: no float32 copy; bfloat16 on CUDA stays converted, untested there).
        host_bf16 = on_host and out.dtype == torch.bfloat16
        if out.dtype not in (torch.float32, torch.float16) and not host_bf16:
            out = out.float()
        out = out.contiguous()  # the kernels take C-order windows
        self._called()
        if host_bf16:
            import ml_dtypes  # here: a ~0.5 s import that float32 runs never need

            return out.cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        if on_host:
            return out.float().cpu().numpy() if out.is_cuda or out.dtype != torch.float32 else out.numpy()
        return out

    @property
    def settled(self) -> bool:
        """After the first call and, on CPU, once the layout probe has picked a layout."""
        return self._calls > 0 and self.channels_last is not None
