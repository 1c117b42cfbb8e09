"""ONNX Runtime: CPU execution provider, or CUDA with I/O binding (``onnxruntime-gpu``).

With I/O binding the window batch and the outputs stay in CUDA torch tensors, so outputs go
straight into the CUDA accumulate kernel with no host round trip. That path needs
``onnxruntime-gpu``, which the build machines lack: it is not exercised by CI.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from atso_fast.runtimes.base import (
    FixedRuntime,
    RuntimeUnavailable,
    check_device,
    check_precision,
    model_bytes,
)

__all__ = ["OnnxRuntime", "onnxruntime_has_cuda"]


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeUnavailable(
            "runtime 'onnxruntime' needs the onnxruntime package: pip install onnxruntime (or onnxruntime-gpu for CUDA)"
        ) from None
    return onnxruntime


def onnxruntime_has_cuda() -> bool:
    try:
        return "CUDAExecutionProvider" in _ort().get_available_providers()
    except RuntimeUnavailable:
        return False


class OnnxRuntime(FixedRuntime):
    name = "onnxruntime"

    def __init__(
        self,
        onnx: str | os.PathLike | bytes,
        *,
        device: str = "cpu",
        precision: str = "float32",
        threads: int | None = None,
        source: str | os.PathLike | None = None,
    ):
        ort = _ort()
        self.device = check_device(device)
        self.precision = check_precision(precision)
        if precision != "float32":
            raise ValueError(f"runtime 'onnxruntime' runs float32 models; use 'tensorrt' or 'torch' for {precision}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.log_severity_level = 3
        # ORT's pool otherwise spins after each run, stealing the cores our stitching kernels
        # (OpenMP) need between runs: measured 10x slower kernels on 2 cores with spinning on.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._device_id = int(device.split(":")[1]) if ":" in device else 0
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if not onnxruntime_has_cuda():
                raise RuntimeUnavailable(
                    "runtime 'onnxruntime' on cuda needs onnxruntime-gpu: "
                    "pip uninstall onnxruntime && pip install onnxruntime-gpu"
                )
            providers = [("CUDAExecutionProvider", {"device_id": self._device_id})]
        data, onnx_path = model_bytes(onnx, source)
        try:  # from the bytes: what was verified is what runs
            self.session = ort.InferenceSession(data, sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ValueError(f"{onnx_path}: ONNX Runtime cannot load the model ({exc})") from None
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0]
        # True: CPU calls return one reused buffer, valid until the next call (the relabel engine
        # consumes each batch before the next); False: a fresh array per call.
        self.reuse_output = False
        self._out_buf: np.ndarray | None = None

    def __call__(self, batch: Any) -> Any:
        if isinstance(batch, np.ndarray):
            out = (
                self._run_cpu_bound(batch)
                if self.reuse_output
                else self.session.run([self._output.name], {self._input: batch})[0]
            )
        else:
            out = self._run_cuda(batch)
        self._called()
        return out

    def _run_cpu_bound(self, batch: np.ndarray) -> np.ndarray:
        """ORT writes straight into one output buffer kept across calls (I/O binding).

        ``session.run`` hands back a copy of ORT's own output, so a call held two batch outputs
        at once (0.41 GiB each at 105 classes x 4 windows of 64^3); the kept buffer also spares
        the page faults of a fresh one per call.
        """
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        shape = (batch.shape[0], *self._out_shape(batch.shape))
        if self._out_buf is None or len(self._out_buf) < shape[0]:  # per-window shape is static
            self._out_buf = None  # drop the old buffer before allocating a new one
            self._out_buf = np.empty(shape, np.float32)
        out = self._out_buf[: shape[0]]  # a short last batch uses the front of the buffer
        binding = self.session.io_binding()
        binding.bind_cpu_input(self._input, batch)
        binding.bind_output(self._output.name, "cpu", 0, np.float32, shape, out.ctypes.data)
        self.session.run_with_iobinding(binding)
        return out

    def _run_cuda(self, batch: Any) -> Any:
        import torch

        batch = batch.contiguous()
        binding = self.session.io_binding()
        binding.bind_input(self._input, "cuda", self._device_id, np.float32, tuple(batch.shape), batch.data_ptr())
        out_shape = (batch.shape[0], *self._out_shape(batch.shape))
        out = torch.empty(out_shape, dtype=torch.float32, device=batch.device)
        binding.bind_output(self._output.name, "cuda", self._device_id, np.float32, out_shape, out.data_ptr())
        torch.cuda.current_stream(batch.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        return out

    def _out_shape(self, in_shape) -> tuple[int, ...]:
        dims = self._output.shape[1:]
        if all(isinstance(d, int) for d in dims):
            return tuple(dims)
        raise ValueError(f"ONNX output shape {self._output.shape} must be static apart from the batch axis")
