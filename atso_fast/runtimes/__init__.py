"""Inference runtimes behind one small interface.

A runtime is a callable ``runtime(batch) -> outputs``: ``batch (B, M, *window)`` float32 (a
NumPy array for ``device="cpu"``, a CUDA torch tensor for ``device="cuda"``) to
``(B, C, *window)`` float32/float16 on the same side; ``runtime.submit(batch)`` starts one
without waiting (see :class:`~atso_fast.runtimes.base.Runtime`). ``create_runtime`` builds one
by name.

``auto`` follows a package's measured agreement when ``model.json`` records one for its network
(:mod:`atso_fast.engine.agreement`, chosen in the engine); otherwise it is this rule, backed by
benchmarks/RESULTS.md, not a measurement at run time: on CPU,
OpenVINO (when installed and the CPU runs the precision), else ONNX Runtime for float32, else
torch; on CUDA, TensorRT when installed, else ONNX Runtime with the CUDA execution provider when
``onnxruntime-gpu`` is installed, else torch. A package without an ONNX file, or a live torch
module, runs on torch. When the first choice cannot load the model, ``load_runtime`` warns and
takes the next.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from atso_fast.io.pt2 import UnsafeArchiveError
from atso_fast.runtimes.base import Pending, Ready, Runtime, RuntimeUnavailable
from atso_fast.runtimes.onnx_rt import OnnxRuntime, onnxruntime_has_cuda
from atso_fast.runtimes.openvino_rt import (
    OpenVinoRuntime,
    openvino_available,
    openvino_supports,
)
from atso_fast.runtimes.tensorrt_rt import TensorRTRuntime, tensorrt_available
from atso_fast.runtimes.torch_rt import TorchRuntime

__all__ = [
    "RUNTIMES",
    "OnnxRuntime",
    "OpenVinoRuntime",
    "Pending",
    "Ready",
    "Runtime",
    "RuntimeUnavailable",
    "TensorRTRuntime",
    "TorchRuntime",
    "auto_candidates",
    "available_runtimes",
    "create_runtime",
    "load_runtime",
    "resolve_runtime",
]

RUNTIMES = ("auto", "openvino", "onnxruntime", "tensorrt", "torch")


def auto_candidates(
    device: str,
    *,
    has_onnx: bool,
    has_module: bool,
    has_program: bool = True,
    precision: str = "float32",
) -> list[str]:
    """The runtimes ``auto`` tries, best first (see the module docstring).

    On CPU OpenVINO leads because it was the fastest runtime in every CPU case measured (the
    figures live in benchmarks/RESULTS.md and the README, not here); ONNX Runtime comes next
    (float32 only) and torch last, when the package has a torch program. Packages that promise
    a reference predictor's labels (imported nnU-Net models) follow the same order: OpenVINO's
    instance norms, once less exact than ONNX Runtime's, are rewritten
    (:mod:`atso_fast.runtimes.onnx_norm`) and now the closest of the three to float64.
    """
    if has_module or not has_onnx:
        return ["torch"]
    if device == "cpu":
        fast = openvino_available() and openvino_supports(precision)
        out = ["openvino"] if fast else []
        if precision == "float32":
            out.append("onnxruntime")
        return out + ["torch"] if has_program or not out else out
    if tensorrt_available():
        return ["tensorrt", "torch"] if has_program else ["tensorrt"]
    return ["onnxruntime"] if onnxruntime_has_cuda() else ["torch"]


def resolve_runtime(
    name: str,
    device: str,
    *,
    has_onnx: bool,
    has_module: bool,
    has_program: bool = True,
    precision: str = "float32",
) -> str:
    """Turn ``auto`` into the runtime it tries first; other names are checked and returned."""
    if name not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {name!r}")
    if name != "auto":
        return name
    return auto_candidates(
        device, has_onnx=has_onnx, has_module=has_module, has_program=has_program, precision=precision
    )[0]


def available_runtimes(device: str) -> list[str]:
    """Runtimes that can run on ``device`` in this environment."""
    out = ["torch"]
    if device == "cpu" and openvino_available():
        out.append("openvino")
    try:
        import onnxruntime  # noqa: F401

        if device == "cpu" or onnxruntime_has_cuda():
            out.append("onnxruntime")
    except ImportError:
        pass
    if device != "cpu" and tensorrt_available():
        out.append("tensorrt")
    return out


def create_runtime(
    name: str,
    *,
    device: str = "cpu",
    package: Any = None,
    module: Any = None,
    precision: str = "float32",
    batch_size: int = 4,
    compile: bool = False,
    threads: int | None = None,
    channels_last: bool | None = None,
) -> Runtime:
    """Build runtime ``name`` (not ``auto``: see :func:`load_runtime`) for a package and/or a live
    module. ``channels_last`` goes to the torch runtime (None: it probes)."""
    if name == "torch":
        return TorchRuntime.create(
            package=package,
            module=module,
            device=device,
            precision=precision,
            compile=compile,
            channels_last=channels_last,
            probe_batch=batch_size,
            threads=threads,
        )
    if name not in RUNTIMES or name == "auto":
        raise ValueError(f"create_runtime takes one of {RUNTIMES[1:]}, got {name!r}")
    if package is None or package.root is None:
        raise ValueError(f"runtime {name!r} needs an exported model package (model.onnx), not a live module")
    onnx, source = package.onnx_bytes(), package.onnx_path  # the verified bytes, never the file again
    if name == "onnxruntime":
        return OnnxRuntime(onnx, device=device, precision=precision, threads=threads, source=source)
    if name == "openvino":
        return OpenVinoRuntime(
            onnx,
            device=device,
            precision=precision,
            batch_size=batch_size,
            window=package.window,
            in_channels=package.in_channels,
            threads=threads,
            source=source,
            onnx_sha256=package.onnx_sha256() if hasattr(package, "onnx_sha256") else None,
        )
    return TensorRTRuntime(
        onnx,
        device=device,
        precision=precision,
        max_batch=batch_size,
        window=package.window,
        in_channels=package.in_channels,
        source=source,
    )


def load_runtime(candidates: Sequence[str], **kw: Any) -> Runtime:
    """The first of ``candidates`` that loads (``create_runtime(name, **kw)``).

    Each one that fails before another loads is reported in a ``RuntimeWarning`` (say an ONNX
    operator OpenVINO does not support); when none loads, the first one's error is raised.
    """
    errors: dict[str, Exception] = {}
    for name in candidates:
        try:
            runtime = create_runtime(name, **kw)
        except UnsafeArchiveError:  # a package that could run code is never a fallback case
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure leaves the next candidate
            if len(candidates) == 1:
                raise
            errors[name] = exc
            continue
        for failed, error in errors.items():  # not `exc`: Python deletes the except clause's name
            warnings.warn(
                f"runtime auto: {failed} did not load ({error}); running {name}", RuntimeWarning, stacklevel=3
            )
        return runtime
    raise next(iter(errors.values()))
