"""Inference runtimes behind one small interface.

A runtime is a callable ``runtime(batch) -> outputs``: ``batch (B, M, *window)`` float32 (a
NumPy array for ``device="cpu"``, a CUDA torch tensor for ``device="cuda"``) to
``(B, C, *window)`` float32/float16 on the same side. ``create_runtime`` picks one by name.

``auto`` on CPU measures when it can: a float32 package with both ``model.onnx`` and
``model.pt2`` and at most ``PROBE_MAX_CLASSES`` classes runs its first full batches on torch
and on ONNX Runtime and keeps the faster (``ProbeRuntime``; which one wins depends on the
model, see benchmarks/RESULTS.md). Otherwise it is a rule: on CPU, ONNX Runtime for float32
when the package has an ONNX file, else torch; on CUDA, TensorRT when installed, else ONNX Runtime with the CUDA execution provider
when ``onnxruntime-gpu`` is installed, else torch. A live torch module always runs on torch.
"""
from __future__ import annotations

import warnings
from typing import Any

from atso_fast.io.pt2 import UnsafeArchiveError
from atso_fast.runtimes.base import Runtime, RuntimeUnavailable
from atso_fast.runtimes.onnx_rt import OnnxRuntime, onnxruntime_has_cuda
from atso_fast.runtimes.probe import ProbeRuntime
from atso_fast.runtimes.tensorrt_rt import TensorRTRuntime, tensorrt_available
from atso_fast.runtimes.torch_rt import TorchRuntime

__all__ = ["PROBE_MAX_CLASSES", "Runtime", "RuntimeUnavailable", "create_runtime", "resolve_runtime", "RUNTIMES",
           "OnnxRuntime", "ProbeRuntime", "TensorRTRuntime", "TorchRuntime", "available_runtimes"]

RUNTIMES = ("auto", "onnxruntime", "tensorrt", "torch")
PROBE_MAX_CLASSES = 16
"""Above this many classes CPU ``auto`` is ONNX Runtime without measuring: it won every
many-class case we measured (105 classes: UNet 1.53x MONAI vs torch 1.12x; conv head 10.8 s vs
46 s), and torch's probe holds extra output-sized copies (105 classes, float16 accumulator:
peak 1.67 GiB with the probe vs 1.27 GiB for ONNX Runtime alone)."""


def resolve_runtime(name: str, device: str, *, has_onnx: bool, has_module: bool, has_program: bool = False,
                    precision: str = "float32", num_classes: int = 1) -> str:
    """Turn ``auto`` into a runtime name (see module docstring).

    Returns ``"auto"`` only where ``auto`` measures (CPU, float32, an ONNX file and a torch
    program, no live module, at most ``PROBE_MAX_CLASSES`` classes); ``create_runtime("auto",
    ...)`` then builds the probe.
    """
    if name not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {name!r}")
    if name != "auto":
        return name
    if has_module or not has_onnx:
        return "torch"
    if device == "cpu":
        if precision != "float32":
            return "torch"  # ONNX Runtime runs float32 models only
        return "auto" if has_program and num_classes <= PROBE_MAX_CLASSES else "onnxruntime"
    if tensorrt_available():
        return "tensorrt"
    return "onnxruntime" if onnxruntime_has_cuda() else "torch"


def available_runtimes(device: str) -> list[str]:
    """Runtimes that can run on ``device`` in this environment."""
    out = ["torch"]
    try:
        import onnxruntime  # noqa: F401

        if device == "cpu" or onnxruntime_has_cuda():
            out.append("onnxruntime")
    except ImportError:
        pass
    if device == "cuda" and tensorrt_available():
        out.append("tensorrt")
    return out


def create_runtime(name: str, *, device: str = "cpu", package: Any = None, module: Any = None,
                   precision: str = "float32", batch_size: int = 4, compile: bool = False,
                   threads: int | None = None) -> Runtime:
    """Build runtime ``name`` (already resolved) for a package and/or a live module."""
    if name == "auto":
        return _probe_runtime(dict(device=device, package=package, precision=precision, batch_size=batch_size,
                                   threads=threads))
    if name == "torch":
        return TorchRuntime.create(package=package, module=module, device=device, precision=precision,
                                   compile=compile, probe_batch=batch_size, threads=threads)
    if package is None or package.root is None:
        raise ValueError(f"runtime {name!r} needs an exported model package (model.onnx), not a live module")
    if name == "onnxruntime":
        return OnnxRuntime(package.onnx_path, device=device, precision=precision, threads=threads)
    if name == "tensorrt":
        return TensorRTRuntime(package.onnx_path, device=device, precision=precision,
                               max_batch=batch_size, window=package.window, in_channels=package.in_channels)
    raise ValueError(f"runtime must be one of {RUNTIMES}, got {name!r}")


def _probe_runtime(kw: dict[str, Any]) -> ProbeRuntime:
    """``auto`` on CPU: both candidates, or the one that loads (a ``model.pt2`` written by another
    torch version may not), with a warning saying why nothing is measured."""
    candidates, errors = {}, {}
    # torch first: its tensors go back to the system after each call, while ORT's arena stays
    # with the session, so probing ORT first would hold both peaks (105 classes: 2.09 GiB
    # peak vs ORT's 1.27 alone)
    for name in ("torch", "onnxruntime"):
        try:
            candidates[name] = create_runtime(name, **kw)
        except UnsafeArchiveError:  # a package that could run code is never a fallback case
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure leaves the other candidate
            errors[name] = exc
    if not candidates:
        raise errors["onnxruntime"]  # the ORT load error names the package file
    for name, exc in errors.items():
        warnings.warn(f"runtime auto: {name} did not load ({exc}); running {next(iter(candidates))} "
                      "without measuring", RuntimeWarning, stacklevel=4)
    return ProbeRuntime(candidates, batch_size=kw["batch_size"])
