"""Entry points to the native kernels (``atso_fast._C``), CPU and CUDA.

One call per kernel. Arrays pass through untouched: ``atso_fast._C`` reads each one (a NumPy
array, a torch tensor, or anything with ``__cuda_array_interface__`` such as a CuPy array),
checks dtype, shape, contiguity and device, and runs the CPU kernels for host arrays or the
CUDA kernels, on the caller's current stream of the array's framework, for CUDA arrays. A bad
argument raises ``ValueError`` or ``TypeError`` naming it and showing its framework, dtype,
shape and device. Nothing is copied silently: a non-contiguous or wrongly typed array is an
error, not a conversion. Only ``origins`` (a few integers) is always read on the host.

``algorithm`` picks the implementation: ``"auto"`` is the blocked CPU kernel for host arrays
and the CUDA kernel for CUDA arrays; the CUDA kernel's algorithm (``"element"``, ``"gather"``,
``"voxel"``) also runs on host arrays, as a host loop over the same per-thread code, so every
CI machine tests the GPU algorithm against the NumPy reference. For float32 it gives the same
bits as the blocked CPU kernel.

If the compiled module is missing (a broken build), the NumPy reference runs instead, without
the argument checks, with a ``RuntimeWarning`` so the package still works, slowly.
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
    "label_dtype",
    "probabilities",
    "resample_finalize",
]


def has_native() -> bool:
    """True when the compiled kernels are importable."""
    return _C is not None


def build_info() -> dict[str, Any]:
    """What ``_C`` was built with: version, cpu_isa, cuda (bool), cuda_version,
    cuda_architectures, openmp, omp_max_threads, plus ``cuda_devices`` visible now."""
    if _C is None:
        return {"native": False, "error": _IMPORT_ERROR, "cuda": False, "cuda_devices": 0}
    return dict(_C.build_info(), native=True)


def has_cuda() -> bool:
    """True when ``_C`` was built with CUDA and a CUDA device is visible."""
    return build_info()["cuda_devices"] > 0


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


def _fallback(what: str) -> None:
    warnings.warn(
        f"atso_fast._C is not available ({_IMPORT_ERROR}); {what} runs the slow NumPy reference",
        RuntimeWarning,
        stacklevel=3,
    )


# ----------------------------------------------------------------------------- kernels
def extract_patches(
    volume: Any,
    origins: Any,
    patch_size: tuple[int, int, int],
    *,
    pad_value: float = 0.0,
    out: Any = None,
    out_dtype: str = "float32",
    algorithm: str = "auto",
) -> Any:
    """Gather windows from a volume, padding outside it with ``pad_value``.

    Args:
        volume: ``(Z, Y, X)`` or ``(M, Z, Y, X)`` float32, host or CUDA.
        origins: ``(B, 3)`` integer window starts (z, y, x); may be negative or overhang.
        patch_size: ``(pz, py, px)``.
        pad_value: value of voxels outside the volume (MONAI pads with 0).
        out: optional ``(B, M, pz, py, px)`` float32/float16 array on the volume's device.
        out_dtype: dtype of a newly allocated ``out``.
        algorithm: ``"auto"``, ``"rows"`` (the CPU kernel) or ``"element"`` (the CUDA
            kernel's, on host arrays a host loop over it).

    Returns:
        ``out``, the windows ``(B, M, pz, py, px)``, in the volume's framework and device.

    Raises:
        ValueError, TypeError: a bad argument, named in the message.
    """
    args = {"pad_value": pad_value}  # the declared arguments (csrc/stitch.h), by keyword to both
    if _C is None:
        _fallback("extract_patches")
        want = reference.extract_patches(
            np.asarray(volume).reshape((-1, *np.shape(volume)[-3:])),
            origins,
            patch_size,
            out_dtype=out_dtype if out is None else out.dtype,
            **args,
        )
        if out is None:
            return want
        out[...] = want
        return out
    return _C.extract_patches(
        volume=volume, origins=origins, patch_size=patch_size, out=out, out_dtype=out_dtype, algorithm=algorithm, **args
    )


def accumulate(
    acc: Any, wsum: Any, patches: Any, origins: Any, importance: Any, z0: int = 0, *, algorithm: str = "auto"
) -> None:
    """Add importance-weighted windows into an accumulator slab, in place.

    ``acc[:, z - z0, y, x] += importance * patch`` and ``wsum[z - z0, y, x] += importance`` for
    every window voxel inside the slab (volume rows ``[z0, z0 + Zs)``) and inside ``Y, X``.
    Deterministic: every voxel receives the windows in batch order, the product rounded, then
    the sum, then the accumulator's dtype, on CPU and CUDA alike (bit-identical).

    Args:
        acc: ``(C, Zs, Y, X)`` float32 (or float16) accumulator.
        wsum: ``(Zs, Y, X)`` float32 weight sum.
        patches: ``(B, C, pz, py, px)`` float32, float16 or bfloat16 window outputs (bfloat16:
            NumPy ``ml_dtypes.bfloat16`` or torch; read exactly, no float32 copy).
        origins: ``(B, 3)`` window starts in volume coordinates.
        importance: ``(pz, py, px)`` float32 weights (``atso_fast.engine.windows.gaussian_importance``).
        z0: volume row where the slab starts.
        algorithm: ``"auto"``, ``"blocked"`` (the CPU kernel) or ``"gather"`` (the CUDA
            kernel's, on host arrays a host loop over it).

    Raises:
        ValueError, TypeError: a bad argument, named in the message.
    """
    args = {"importance": importance, "z0": z0}  # the declared arguments (csrc/stitch.h)
    if _C is None:
        _fallback("accumulate")
        reference.accumulate(acc, wsum, patches, origins, **args)
        return
    _C.accumulate(acc=acc, wsum=wsum, patches=patches, origins=origins, algorithm=algorithm, **args)


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


def _finalize_result(labels: Any, confidence: Any, counts: np.ndarray) -> FinalizeResult:
    """A kernel's ``(labels, confidence, counts (K + 2,))`` as a :class:`FinalizeResult`."""
    k = len(counts) - 2
    return FinalizeResult(labels, confidence, counts[:k].copy(), int(counts[k]), int(counts[k + 1]))


def label_dtype(channels: int, ignore_index: int, kind: str = "logits") -> np.dtype:
    """The dtype of :func:`finalize`'s labels for ``channels`` outputs: uint8, or uint16 when a
    class index or ``ignore_index`` exceeds 255 (the one rule; the engine's label maps use it)."""
    return np.dtype(_check_finalize_args(channels, 0.0, ignore_index, kind))


def _check_finalize_args(channels: int, threshold: float, ignore_index: int, kind: str) -> str:
    """Label dtype (``"uint8"`` or ``"uint16"``) of :func:`finalize`; raises ``ValueError`` for a
    bad ``threshold``, ``ignore_index`` or ``kind`` (the kernel's own check)."""
    k = reference.num_label_classes(channels)
    if _C is None:
        return "uint8" if max(k - 1, int(ignore_index)) <= 255 else "uint16"
    return _C.finalize_label_dtype(channels=channels, threshold=threshold, ignore_index=ignore_index, kind=kind)


def finalize(
    acc: Any,
    wsum: Any,
    threshold: float = 0.0,
    ignore_index: int = 255,
    kind: str = "logits",
    *,
    rows: tuple[int, int] | None = None,
    algorithm: str = "auto",
) -> FinalizeResult:
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
        algorithm: ``"auto"``, ``"blocked"`` (the CPU kernel) or ``"voxel"`` (the CUDA
            kernel's, on host arrays a host loop over it).

    Returns:
        FinalizeResult with labels/confidence of shape ``(end - start, Y, X)``.

    Raises:
        ValueError, TypeError: a bad argument, named in the message.
    """
    if _C is None:
        _fallback("finalize")
        r0, r1 = rows if rows is not None else (0, wsum.shape[0])
        labels, confidence, counts = reference.finalize(
            acc[:, r0:r1], wsum[r0:r1], threshold=threshold, ignore_index=ignore_index, kind=kind
        )
    else:  # the scalars as declared in csrc/finalize.h
        labels, confidence, counts = _C.finalize(
            acc=acc,
            wsum=wsum,
            rows=rows,
            algorithm=algorithm,
            threshold=threshold,
            ignore_index=ignore_index,
            kind=kind,
        )
    return _finalize_result(labels, confidence, counts)


def probabilities(
    acc: Any, wsum: Any, kind: str = "logits", *, rows: tuple[int, int] | None = None, algorithm: str = "auto"
) -> Any:
    """Normalise a blended slab into per-channel probabilities, those :func:`finalize` decides on.

    Divides by ``wsum``; softmax over channels for ``kind="logits"`` (for one channel, the sigmoid
    of its logit: the foreground probability); for ``kind="probabilities"`` the blended values
    themselves. The element math is :func:`finalize`'s (one polynomial exp, every step rounded
    alike on CPU and CUDA): the channel ``finalize`` labels holds the largest probability, and
    that probability x 255, rounded, is ``finalize``'s confidence (for one channel: where the
    label is 1). A voxel ``finalize`` counts invalid (zero or non-finite weight, a non-finite
    value) is NaN in every channel.

    Args:
        acc: ``(C, Zs, Y, X)`` float32/float16 blended sums.
        wsum: ``(Zs, Y, X)`` float32 weight sums.
        kind: ``"logits"`` or ``"probabilities"``.
        rows: only slab rows ``[start, end)`` (read in place, no copy); default all.
        algorithm: ``"auto"``, ``"blocked"`` (the CPU kernel) or ``"voxel"`` (the CUDA
            kernel's, on host arrays a host loop over it).

    Returns:
        ``(C, end - start, Y, X)`` float32, in the framework and on the device of ``acc``.

    Raises:
        ValueError, TypeError: a bad argument, named in the message.
    """
    if _C is None:
        _fallback("probabilities")
        r0, r1 = rows if rows is not None else (0, wsum.shape[0])
        return reference.probabilities(acc[:, r0:r1], wsum[r0:r1], kind=kind)
    # the declared arguments as in csrc/finalize.h (ATSO_PROBABILITIES_ARGS)
    return _C.probabilities(acc=acc, wsum=wsum, rows=rows, algorithm=algorithm, kind=kind)


def resample_finalize(
    rows: Any, y_taps: tuple, x_taps: tuple, threshold: float = 0.0, ignore_index: int = 255, kind: str = "logits"
) -> FinalizeResult:
    """Bilinear resampling of rows onto a finer (or coarser) plane, then :func:`finalize`, in one pass.

    The same labels, confidence and counts as resampling every ``(c, r)`` plane with the taps
    (``reference.bilinear_rows``: aten's ``upsample_bilinear2d`` arithmetic for taps from
    ``atso_fast.engine.resample.bilinear_taps``) and finalising the result with unit weights,
    without the ``C x R x Yn x Xn`` intermediate. Host arrays only (blocked CPU kernel).

    Args:
        rows: ``(C, R, Yt, Xt)`` float32, C-contiguous: blended values (already divided by
            their weights).
        y_taps, x_taps: ``(i0, i1, w0, w1)`` per output index of the axis: int64 input indices
            and float32 weights, each 1-D of the output's length (Yn, Xn).
        threshold, ignore_index, kind: as :func:`finalize`.

    Returns:
        FinalizeResult with labels/confidence of shape ``(R, Yn, Xn)``.

    Raises:
        ValueError, TypeError: a bad argument (an index outside its input included), named in the message.
    """
    if _C is None:
        _fallback("resample_finalize")
        vals = reference.bilinear_rows(np.asarray(rows), y_taps, x_taps)
        labels, confidence, counts = reference.finalize(
            vals, np.ones(vals.shape[1:], np.float32), threshold=threshold, ignore_index=ignore_index, kind=kind
        )
    else:  # finalize's declared scalars
        labels, confidence, counts = _C.resample_finalize(
            rows=rows,
            y_taps=tuple(y_taps),
            x_taps=tuple(x_taps),
            threshold=threshold,
            ignore_index=ignore_index,
            kind=kind,
        )
    return _finalize_result(labels, confidence, counts)
