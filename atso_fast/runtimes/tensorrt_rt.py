"""TensorRT runtime: engine built from the package's ONNX file and cached on disk.

The engine has one optimisation profile over the batch axis (1 .. max_batch) and fp16 kernels
when ``precision="float16"``. It is cached under ``cache_dir`` (default
``~/.cache/atso_fast/tensorrt``) keyed by the ONNX file's SHA-256, the GPU name, the TensorRT
version, precision and max batch, so a second run skips the build.

Not verified on the build machines: they have no TensorRT and no GPU. CI only checks that a
missing TensorRT gives a clear error.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from atso_fast.io.blob_cache import BlobCache
from atso_fast.runtimes.base import (
    FixedRuntime,
    RuntimeUnavailable,
    check_device,
    check_precision,
    model_bytes,
)

__all__ = ["TensorRTRuntime", "tensorrt_available", "engine_cache_key"]


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def engine_cache_key(onnx_bytes: bytes, gpu_name: str, trt_version: str, precision: str, max_batch: int) -> str:
    h = hashlib.sha256(onnx_bytes)
    h.update(f"|{gpu_name}|{trt_version}|{precision}|{max_batch}".encode())
    return h.hexdigest()[:32]


class TensorRTRuntime(FixedRuntime):
    name = "tensorrt"

    def __init__(
        self,
        onnx: str | os.PathLike | bytes,
        *,
        device: str = "cuda",
        precision: str = "float16",
        max_batch: int = 4,
        window: tuple[int, ...] = (),
        in_channels: int = 1,
        cache_dir: str | os.PathLike | None = None,
        source: str | os.PathLike | None = None,
    ):
        if not tensorrt_available():
            raise RuntimeUnavailable("runtime 'tensorrt' needs NVIDIA TensorRT: pip install tensorrt (and a CUDA GPU)")
        self.device = check_device(device)
        self.precision = check_precision(precision)
        if not device.startswith("cuda"):
            raise ValueError("runtime 'tensorrt' needs device cuda")
        self.max_batch = max(1, int(max_batch))
        self._shape = (in_channels, *window)
        cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "atso_fast" / "tensorrt"
        self._engine = self._load_or_build(*model_bytes(onnx, source), BlobCache(cache, f"runtime {self.name}"))
        self._context = self._engine.create_execution_context()

    def _load_or_build(self, data: bytes, onnx_path: Path, cache: BlobCache) -> Any:
        """The engine from the cache (its checks: :class:`BlobCache`), else built and cached."""
        import tensorrt as trt
        import torch

        gpu = torch.cuda.get_device_name(torch.device(self.device))
        key = engine_cache_key(data, gpu, trt.__version__, self.precision, self.max_batch)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        blob = cache.load(key)
        engine = None if blob is None else runtime.deserialize_cuda_engine(blob)
        if engine is not None:
            return engine
        plan = self._build(trt, logger, data, onnx_path)
        cache.store(key, plan)
        return runtime.deserialize_cuda_engine(plan)

    def _build(self, trt: Any, logger: Any, data: bytes, onnx_path: Path) -> bytes:
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(data):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ValueError(f"{onnx_path}: TensorRT cannot parse the model ({errors})")
        config = builder.create_builder_config()
        if self.precision == "float16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif self.precision == "bfloat16":
            config.set_flag(trt.BuilderFlag.BF16)
        profile = builder.create_optimization_profile()
        name = network.get_input(0).name
        profile.set_shape(name, (1, *self._shape), (self.max_batch, *self._shape), (self.max_batch, *self._shape))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ValueError(f"{onnx_path}: TensorRT engine build failed (see TensorRT log above)")
        return bytes(plan)

    def __call__(self, batch: Any) -> Any:
        import torch

        if not isinstance(batch, torch.Tensor) or not batch.is_cuda:
            raise TypeError("runtime 'tensorrt' takes CUDA torch tensors")
        outs = [self._run(chunk.contiguous()) for chunk in torch.split(batch, self.max_batch)]
        self._called()
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _run(self, batch: Any) -> Any:
        import torch

        engine, ctx = self._engine, self._context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        in_name, out_name = names[0], names[-1]
        ctx.set_input_shape(in_name, tuple(batch.shape))
        out = torch.empty(tuple(ctx.get_tensor_shape(out_name)), dtype=torch.float32, device=batch.device)
        x = batch if batch.dtype == torch.float32 else batch.float()  # keep alive until the run ends
        ctx.set_tensor_address(in_name, x.data_ptr())
        ctx.set_tensor_address(out_name, out.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream(batch.device).cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return out
