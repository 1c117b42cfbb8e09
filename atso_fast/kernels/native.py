"""Validated entry points to the native kernels (``atso_fast._C``), CPU and CUDA.

Arrays on the host (NumPy arrays, CPU torch tensors) run the C++/OpenMP kernels; CUDA torch
tensors or CuPy arrays run the CUDA kernels on the caller's current stream. Every argument is
checked here (dtype, shape, contiguity, device) and a bad one raises ``ValueError`` or
``TypeError`` naming it. Nothing is copied silently: a non-contiguous or wrongly typed array is
an error, not a conversion. Only ``origins`` (a few integers) is always read on the host.

If the compiled module is missing (a broken build), the NumPy reference runs instead with a
``RuntimeWarning`` so the package still works, slowly.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from atso_fast.kernels import reference

try:
    from atso_fast import _C
except ImportError as exc:  # pragma: no cover - exercised only on a broken build
    _C = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""

__all__ = [
    "FinalizeResult",
    "accumulate",
    "build_info",
    "extract_patches",
    "finalize",
    "has_cuda",
    "has_native",
    "kernel_threads",
]

_KINDS = {"logits": 0, "probabilities": 1}
_FLOAT_CODES = {"float32": 0, "float16": 1}


def has_native() -> bool:
    """True when the compiled kernels are importable."""
    return _C is not None


def build_info() -> dict[str, Any]:
    """What ``_C`` was built with: version, cuda (bool), cuda_version, openmp, omp_max_threads,
    plus ``cuda_devices`` visible now."""
    if _C is None:
        return {"native": False, "error": _IMPORT_ERROR, "cuda": False, "cuda_devices": 0}
    info = dict(_C.build_info(), native=True)
    info["cuda_devices"] = _C.cuda_device_count() if info["cuda"] else 0
    return info


@contextmanager
def kernel_threads(n: int | None):
    """CPU kernels called from this thread inside the block use ``n`` OpenMP threads.

    ``None`` or 0 keeps the OpenMP default. The setting is per calling thread and restored on
    exit. No effect on CUDA kernels or without the native module.
    """
    if _C is None or not n:
        yield
        return
    if int(n) < 0:
        raise ValueError(f"kernel threads must be >= 0, got {n}")
    before = _C.kernel_threads()
    _C.set_kernel_threads(int(n))
    try:
        yield
    finally:
        _C.set_kernel_threads(before)


def has_cuda() -> bool:
    """True when ``_C`` was built with CUDA and a CUDA device is visible."""
    return build_info()["cuda_devices"] > 0


# ----------------------------------------------------------------------------- array views
@dataclass
class _View:
    """What the kernels need to know about one argument, whatever its framework."""

    name: str
    obj: Any
    framework: str  # "numpy" | "torch" | "cupy"
    cuda: bool
    dtype: str
    shape: tuple[int, ...]
    contiguous: bool
    device_index: int | None = None

    def describe(self) -> str:
        where = f"cuda:{self.device_index}" if self.cuda else "cpu"
        return f"{self.framework} {self.dtype} array of shape {self.shape} on {where}"

    def host_array(self) -> np.ndarray:
        return self.obj.numpy() if self.framework == "torch" else self.obj

    def ptr(self) -> int:
        return int(self.obj.data_ptr()) if self.framework == "torch" else int(self.obj.data.ptr)


def _view(name: str, obj: Any) -> _View:
    module = type(obj).__module__.split(".")[0]
    if isinstance(obj, np.ndarray):
        return _View(name, obj, "numpy", False, obj.dtype.name, obj.shape, obj.flags.c_contiguous)
    if module == "torch":
        dtype = str(obj.dtype).replace("torch.", "")
        cuda = obj.device.type == "cuda"
        if obj.device.type not in ("cpu", "cuda"):
            raise TypeError(f"{name} must be on cpu or cuda, got a tensor on {obj.device}")
        return _View(name, obj, "torch", cuda, dtype, tuple(obj.shape), obj.is_contiguous(),
                     obj.device.index if cuda else None)
    if module == "cupy":
        return _View(name, obj, "cupy", True, obj.dtype.name, obj.shape, obj.flags.c_contiguous,
                     obj.device.id)
    raise TypeError(f"{name} must be a numpy array, torch tensor or cupy array, got {type(obj).__name__}")


def _check(view: _View, dtypes: tuple[str, ...], ndim: int | None = None) -> None:
    if view.dtype not in dtypes:
        raise ValueError(f"{view.name} must have dtype {' or '.join(dtypes)}, got {view.describe()}")
    if ndim is not None and len(view.shape) != ndim:
        raise ValueError(f"{view.name} must have {ndim} dimensions, got {view.describe()}")
    if not view.contiguous:
        raise ValueError(f"{view.name} must be C-contiguous (call .contiguous()/np.ascontiguousarray "
                         f"yourself; no silent copies), got a strided {view.describe()}")


def _same_device(views: list[_View]) -> bool:
    """True when every array is on one CUDA device, False when all are on the host."""
    cuda = {v.cuda for v in views}
    if len(cuda) > 1:
        desc = ", ".join(f"{v.name}: {v.describe()}" for v in views)
        raise ValueError(f"arrays must all be on the host or all on one CUDA device; got {desc}")
    if cuda == {True}:
        devices = {v.device_index for v in views}
        if len(devices) > 1:
            raise ValueError(f"arrays are on different CUDA devices: {sorted(devices)}")
        if _C is None or not hasattr(_C, "accumulate_cuda"):
            raise RuntimeError("CUDA arrays were passed but atso_fast._C was built without CUDA "
                               f"(build_info: {build_info()}); rebuild with nvcc on PATH")
        return True
    return False


def _origins(origins: Any, batch: int | None) -> np.ndarray:
    if type(origins).__module__.split(".")[0] in ("torch", "cupy"):
        origins = origins.get() if hasattr(origins, "get") else origins.cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(origins), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 3 or (batch is not None and arr.shape[0] != batch):
        want = f"({batch}, 3)" if batch is not None else "(B, 3)"
        raise ValueError(f"origins must have shape {want}, got {arr.shape}")
    return arr


def _stream(view: _View) -> int:
    if view.framework == "torch":
        import torch

        return int(torch.cuda.current_stream(view.obj.device).cuda_stream)
    import cupy

    return int(cupy.cuda.get_current_stream().ptr)


def _fallback(what: str) -> None:
    warnings.warn(f"atso_fast._C is not available ({_IMPORT_ERROR}); {what} runs the slow NumPy "
                  "reference", RuntimeWarning, stacklevel=3)


def _empty_like_framework(like: _View, shape: tuple[int, ...], dtype: str) -> Any:
    if like.framework == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=like.obj.device)
    if like.framework == "cupy":
        import cupy

        with cupy.cuda.Device(like.device_index):
            return cupy.empty(shape, dtype=dtype)
    return np.empty(shape, dtype=dtype)


def _as_4d(volume: Any, view: _View) -> Any:
    if len(view.shape) == 3:
        return volume.reshape((1, *view.shape))  # a view for contiguous numpy/torch/cupy
    if len(view.shape) != 4:
        raise ValueError(f"volume must be (Z, Y, X) or (M, Z, Y, X), got {view.describe()}")
    return volume


# ----------------------------------------------------------------------------- kernels
def extract_patches(volume: Any, origins: Any, patch_size: tuple[int, int, int], *,
                    pad_value: float = 0.0, out: Any = None, out_dtype: str = "float32") -> Any:
    """Gather windows from a volume, padding outside it with ``pad_value``.

    Args:
        volume: ``(Z, Y, X)`` or ``(M, Z, Y, X)`` float32, host or CUDA.
        origins: ``(B, 3)`` integer window starts (z, y, x); may be negative or overhang.
        patch_size: ``(pz, py, px)``.
        pad_value: value of voxels outside the volume (MONAI pads with 0).
        out: optional ``(B, M, pz, py, px)`` float32/float16 array on the volume's device.
        out_dtype: dtype of a newly allocated ``out``.

    Returns:
        ``out``, the windows ``(B, M, pz, py, px)``.
    """
    vview = _view("volume", volume)
    _check(vview, ("float32",))
    volume = _as_4d(volume, vview)
    vview = _view("volume", volume)
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch_size must be three positive integers, got {patch_size!r}")
    org = _origins(origins, None)
    shape = (org.shape[0], vview.shape[0], *patch)
    if out is None:
        if out_dtype not in _FLOAT_CODES:
            raise ValueError(f"out_dtype must be float32 or float16, got {out_dtype!r}")
        out = _empty_like_framework(vview, shape, out_dtype)
    oview = _view("out", out)
    _check(oview, tuple(_FLOAT_CODES), 5)
    if oview.shape != shape:
        raise ValueError(f"out must have shape {shape}, got {oview.describe()}")
    if _same_device([vview, oview]):
        _C.extract_patches_cuda(vview.ptr(), vview.shape[0], list(vview.shape[1:]), org, list(patch),
                                float(pad_value), oview.ptr(), _FLOAT_CODES[oview.dtype], _stream(vview))
    elif _C is None:
        _fallback("extract_patches")
        oview.host_array()[...] = reference.extract_patches(vview.host_array(), org, patch, pad_value)
    else:
        _C.extract_patches(vview.host_array(), org, oview.host_array(), float(pad_value))
    return out


def _check_accumulate(acc: _View, wsum: _View, patches: _View, imp: _View) -> None:
    _check(acc, tuple(_FLOAT_CODES), 4)
    _check(wsum, ("float32",), 3)
    _check(patches, tuple(_FLOAT_CODES), 5)
    _check(imp, ("float32",), 3)
    if wsum.shape != acc.shape[1:]:
        raise ValueError(f"wsum must have shape {acc.shape[1:]} (acc's spatial shape), got {wsum.describe()}")
    if patches.shape[1] != acc.shape[0] and patches.shape[0] > 0:
        raise ValueError(f"patches must have {acc.shape[0]} channels like acc, got {patches.describe()}")
    if imp.shape != patches.shape[2:]:
        raise ValueError(f"importance must have the window shape {patches.shape[2:]}, got {imp.describe()}")


def accumulate(acc: Any, wsum: Any, patches: Any, origins: Any, importance: Any, z0: int = 0) -> None:
    """Add importance-weighted windows into an accumulator slab, in place.

    ``acc[:, z - z0, y, x] += importance * patch`` and ``wsum[z - z0, y, x] += importance`` for
    every window voxel inside the slab (volume rows ``[z0, z0 + Zs)``) and inside ``Y, X``.
    Deterministic: every voxel receives the windows in batch order, on CPU and CUDA alike.

    Args:
        acc: ``(C, Zs, Y, X)`` float32 (or float16) accumulator.
        wsum: ``(Zs, Y, X)`` float32 weight sum.
        patches: ``(B, C, pz, py, px)`` float32 or float16 window outputs.
        origins: ``(B, 3)`` window starts in volume coordinates.
        importance: ``(pz, py, px)`` float32 weights (``atso_fast.engine.windows.gaussian_importance``).
        z0: volume row where the slab starts.
    """
    views = [_view("acc", acc), _view("wsum", wsum), _view("patches", patches), _view("importance", importance)]
    _check_accumulate(*views)
    va, vw, vp, vi = views
    org = _origins(origins, vp.shape[0])
    if vp.shape[0] == 0:
        return
    if _same_device(views):
        _C.accumulate_cuda(va.ptr(), _FLOAT_CODES[va.dtype], vw.ptr(), va.shape[0], list(va.shape[1:]),
                           int(z0), vp.ptr(), _FLOAT_CODES[vp.dtype], org, list(vp.shape[2:]), vi.ptr(),
                           _stream(va))
    elif _C is None:
        _fallback("accumulate")
        reference.accumulate(va.host_array(), vw.host_array(), vp.host_array(), org, vi.host_array(), int(z0))
    else:
        _C.accumulate(va.host_array(), vw.host_array(), vp.host_array(), org, vi.host_array(), int(z0))


@dataclass
class FinalizeResult:
    """Output of :func:`finalize`.

    Attributes:
        labels: ``(Zs, Y, X)`` uint8/uint16, same framework and device as the input.
        confidence: ``(Zs, Y, X)`` uint8, max probability x 255, 0 where invalid.
        counts: host int64 ``(K,)`` voxels per label class (K = max(C, 2)).
        ignored: voxels whose max probability was below the threshold.
        invalid: voxels with zero weight or non-finite values.
    """

    labels: Any
    confidence: Any
    counts: np.ndarray
    ignored: int
    invalid: int


def _check_finalize_args(channels: int, threshold: float, ignore_index: int, kind: str) -> str:
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'logits' or 'probabilities', got {kind!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    k = reference.num_label_classes(channels)
    if not k <= int(ignore_index) <= 65535:
        raise ValueError(f"ignore_index must be in [{k}, 65535] (not a class label), got {ignore_index}")
    return "uint8" if max(k - 1, int(ignore_index)) <= 255 else "uint16"


def _rows(rows: tuple[int, int] | None, depth: int) -> tuple[int, int]:
    if rows is None:
        return 0, depth
    r0, r1 = (int(r) for r in rows)
    if not 0 <= r0 <= r1 <= depth:
        raise ValueError(f"rows must satisfy 0 <= start <= end <= {depth}, got {rows!r}")
    return r0, r1


def finalize(acc: Any, wsum: Any, threshold: float = 0.0, ignore_index: int = 255,
             kind: str = "logits", *, rows: tuple[int, int] | None = None) -> FinalizeResult:
    """Normalise a blended slab and turn it into pseudo labels.

    Divides by ``wsum``; softmax over channels for ``kind="logits"`` (sigmoid for one channel,
    which yields background/foreground); argmax with the lowest index winning ties; voxels whose
    max probability is below ``threshold`` get ``ignore_index``; so do voxels with zero weight
    or non-finite values, counted separately.

    Args:
        acc: ``(C, Zs, Y, X)`` float32/float16 blended sums.
        wsum: ``(Zs, Y, X)`` float32 weight sums.
        threshold: minimum max-probability in ``[0, 1]`` (equal values are kept).
        ignore_index: label for ignored voxels; must not be a class index.
        kind: ``"logits"`` or ``"probabilities"``.
        rows: finalise only slab rows ``[start, end)`` (in place, no copy); default all.

    Returns:
        FinalizeResult with labels/confidence of shape ``(end - start, Y, X)``.
    """
    va, vw = _view("acc", acc), _view("wsum", wsum)
    _check(va, tuple(_FLOAT_CODES), 4)
    _check(vw, ("float32",), 3)
    if vw.shape != va.shape[1:]:
        raise ValueError(f"wsum must have shape {va.shape[1:]}, got {vw.describe()}")
    c = va.shape[0]
    if c < 1:
        raise ValueError(f"acc must have at least one channel, got {va.describe()}")
    ldtype = _check_finalize_args(c, threshold, ignore_index, kind)
    r0, r1 = _rows(rows, vw.shape[0])
    k = reference.num_label_classes(c)
    out_shape = (r1 - r0, *vw.shape[1:])
    labels = _empty_like_framework(va, out_shape, ldtype)
    confidence = _empty_like_framework(va, out_shape, "uint8")
    if _same_device([va, vw]):
        counts = _finalize_cuda(va, vw, (r0, r1), threshold, ignore_index, kind, labels, confidence, k)
    else:
        counts = np.zeros(k + 2, np.int64)
        lv, cv = _view("labels", labels).host_array(), _view("confidence", confidence).host_array()
        if _C is None:
            _fallback("finalize")
            lv[...], cv[...], counts = reference.finalize(va.host_array()[:, r0:r1], vw.host_array()[r0:r1],
                                                          threshold, ignore_index, kind)
        else:
            _C.finalize(va.host_array(), vw.host_array(), r0, r1, float(threshold), int(ignore_index),
                        _KINDS[kind], lv, cv, counts)
    return FinalizeResult(labels, confidence, counts[:k].copy(), int(counts[k]), int(counts[k + 1]))


def _finalize_cuda(va: _View, vw: _View, rows: tuple[int, int], threshold: float, ignore_index: int,
                   kind: str, labels: Any, confidence: Any, k: int) -> np.ndarray:
    counts_dev = _empty_like_framework(va, (k + 2,), "int64")
    counts_dev[...] = 0
    vl, vc, vn = _view("labels", labels), _view("confidence", confidence), _view("counts", counts_dev)
    plane = int(np.prod(vw.shape[1:]))
    acc_item = 4 if va.dtype == "float32" else 2
    _C.finalize_cuda(va.ptr() + rows[0] * plane * acc_item, _FLOAT_CODES[va.dtype], vw.ptr() + rows[0] * plane * 4,
                     va.shape[0], (rows[1] - rows[0]) * plane, vw.shape[0] * plane, float(threshold),
                     int(ignore_index), _KINDS[kind], vl.ptr(), np.dtype(vl.dtype).itemsize, vc.ptr(), vn.ptr(),
                     _stream(va))
    return counts_dev.cpu().numpy() if vn.framework == "torch" else counts_dev.get()
