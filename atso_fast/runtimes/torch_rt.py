"""PyTorch runtime: eager or ``torch.compile``, float32/float16/bfloat16."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any

import numpy as np

from atso_fast.runtimes.base import RuntimeUnavailable, check_device, check_precision

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


class TorchRuntime:
    """Runs a torch module. float16 needs CUDA; bfloat16 runs on both (autocast-free casts)."""

    name = "torch"

    def __init__(self, module: Any, *, device: str = "cpu", precision: str = "float32", compile: bool = False):
        import torch

        self.device = check_device(device)
        self.precision = check_precision(precision)
        if precision == "float16" and not device.startswith("cuda"):
            raise ValueError("precision float16 needs device cuda (use bfloat16 or float32 on cpu)")
        self._dtype = getattr(torch, precision)
        param = next(iter(module.parameters()), None)
        if param is not None and (param.dtype != self._dtype or param.device != torch.device(device)):
            module = copy.deepcopy(module)  # never convert the caller's module in place
        self.module = module.to(device=device, dtype=self._dtype)
        self._fn = torch.compile(self.module, dynamic=False) if compile else self.module

    @classmethod
    def create(cls, *, package: Any = None, module: Any = None, **kw) -> TorchRuntime:
        if module is None:
            module = cls._load_program(package)
        return cls(module, **kw)

    @staticmethod
    def _load_program(package: Any) -> Any:
        import torch

        if package is None or package.root is None or not package.torch_file:
            raise RuntimeUnavailable("this model package has no torch program (model.pt2); use runtime "
                                     "'onnxruntime' or re-export with atso_fast.export_model")
        path = package.root / package.torch_file
        if not path.is_file():
            raise RuntimeUnavailable(f"{path}: torch program named in model.json not found")
        return torch.export.load(str(path)).module()

    def __call__(self, batch: Any) -> Any:
        import torch

        on_host = isinstance(batch, np.ndarray)
        x = torch.from_numpy(batch) if on_host else batch
        with torch.inference_mode(), _eval_mode(self.module):
            out = self._fn(x.to(device=self.device, dtype=self._dtype, non_blocking=True))
        if out.dtype not in (torch.float32, torch.float16):
            out = out.float()  # kernels take float32/float16 windows
        if on_host:
            return out.float().cpu().numpy() if out.is_cuda or out.dtype != torch.float32 else out.numpy()
        return out.contiguous()
