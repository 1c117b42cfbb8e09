"""Sliding-window maths: window grid and gaussian importance map, MONAI-compatible.

The grid reproduces ``monai.inferers.sliding_window_inference``: the image is (virtually)
padded to at least the window size, symmetrically (``pad_before = (roi - size) // 2``), then
windows start every ``int(roi * (1 - overlap))`` voxels with the last window shifted back so
it ends at the border. We never materialise the padding: a window origin is returned in
volume coordinates and may be negative; ``extract_patches`` fills what lies outside with the
pad value (MONAI's default constant 0) and ``accumulate`` clips to the volume.

The gaussian is MONAI's ``compute_importance_map(mode="gaussian", sigma_scale=0.125)``:
``exp(-x^2 / (2 sigma^2))`` with ``x`` centred at ``(p - 1) / 2`` and ``sigma = 0.125 p``,
separable, with values below ``max(min, 1e-3)`` clamped up to it (nnU-Net instead normalises to
a maximum of 1 and replaces zeros with the smallest non-zero value; for blending only the ratio
matters, and MONAI is the reference our tests compare to).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

__all__ = [
    "as_triple",
    "check_overlap",
    "padding_before",
    "scan_intervals",
    "window_starts",
    "sliding_window_origins",
    "gaussian_importance",
]


def as_triple(value: int | float | Sequence[int | float], name: str, ndim: int = 3) -> tuple:
    """Broadcast a scalar to an ``ndim`` tuple, or check a sequence has ``ndim`` entries."""
    if isinstance(value, (int, float, np.integer, np.floating)):
        return (value,) * ndim
    out = tuple(value)
    if len(out) != ndim:
        raise ValueError(f"{name} must be a number or {ndim} numbers, got {value!r}")
    return out


def check_overlap(overlap: float | Sequence[float]) -> tuple[float, float, float]:
    """Validate overlap (each in ``[0, 1)``) and broadcast it to three axes."""
    out = tuple(float(o) for o in as_triple(overlap, "overlap"))
    for o in out:
        if not 0.0 <= o < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    return out  # type: ignore[return-value]


def _check_sizes(image_size: Sequence[int], roi: Sequence[int]) -> None:
    if len(image_size) != len(roi):
        raise ValueError(f"image size {tuple(image_size)} and window {tuple(roi)} differ in rank")
    if any(int(r) < 1 for r in roi):
        raise ValueError(f"window sizes must be >= 1, got {tuple(roi)}")
    if any(int(s) < 1 for s in image_size):
        raise ValueError(f"image sizes must be >= 1, got {tuple(image_size)}")


def padding_before(image_size: Sequence[int], roi: Sequence[int]) -> tuple[int, ...]:
    """Voxels MONAI pads before each axis so the image is at least one window large."""
    _check_sizes(image_size, roi)
    return tuple(max(int(r) - int(s), 0) // 2 for s, r in zip(image_size, roi))


def scan_intervals(padded_size: Sequence[int], roi: Sequence[int], overlap: Sequence[float]) -> tuple[int, ...]:
    """MONAI ``_get_scan_interval``: step between window starts on each axis."""
    out = []
    for size, r, o in zip(padded_size, roi, overlap):
        if int(r) == int(size):
            out.append(int(r))
        else:
            step = int(int(r) * (1 - o))
            out.append(step if step > 0 else 1)
    return tuple(out)


def window_starts(size: int, roi: int, interval: int) -> list[int]:
    """MONAI ``dense_patch_slices`` along one axis of a (padded) image of ``size >= roi``."""
    num = int(math.ceil(float(size) / interval))
    count = next((d + 1 for d in range(num) if d * interval + roi >= size), 1)
    return [i * interval - max(i * interval + roi - size, 0) for i in range(count)]


def sliding_window_origins(
    image_size: Sequence[int], roi: Sequence[int], overlap: float | Sequence[float] = 0.25
) -> np.ndarray:
    """Window origins ``(N, D)`` int64 in volume coordinates, z-major (MONAI's order).

    Args:
        image_size: spatial size of the volume, e.g. ``(Z, Y, X)``.
        roi: window size, same rank.
        overlap: fraction in ``[0, 1)``, scalar or per axis.

    Returns:
        int64 array of window starts; negative where MONAI would have padded.
    """
    _check_sizes(image_size, roi)
    ov = as_triple(overlap, "overlap", len(roi))
    check_overlap(ov if len(ov) == 3 else ov[0])
    pad = padding_before(image_size, roi)
    padded = [max(int(s), int(r)) for s, r in zip(image_size, roi)]
    steps = scan_intervals(padded, roi, ov)
    axes = [np.asarray(window_starts(s, int(r), st), np.int64) - p
            for s, r, st, p in zip(padded, roi, steps, pad)]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1).astype(np.int64)


@lru_cache(maxsize=16)
def _gaussian_cached(patch: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    out = np.ones((), np.float32)
    for p, s in zip(patch, sigma):
        # float32 like MONAI's torch.arange(dtype=float) so the maps agree to the last bit.
        x = np.arange(-(p - 1) / 2.0, (p - 1) / 2.0 + 1, dtype=np.float32)[:p]
        g = np.exp(x**2 / np.float32(-2 * (p * s) ** 2)).astype(np.float32)
        out = np.multiply.outer(out, g).astype(np.float32)
    floor = max(float(out.min()), 1e-3)
    out = np.maximum(out, np.float32(floor))
    out.setflags(write=False)
    return out


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float | Sequence[float] = 0.125) -> np.ndarray:
    """Separable gaussian importance map ``patch_size`` float32 (read-only, cached).

    Raises:
        ValueError: non-positive sizes or sigma scales.
    """
    patch = tuple(int(p) for p in patch_size)
    if not patch or any(p < 1 for p in patch):
        raise ValueError(f"patch_size must be positive integers, got {tuple(patch_size)!r}")
    sig = tuple(float(s) for s in as_triple(sigma_scale, "sigma_scale", len(patch)))
    if any(s <= 0 for s in sig):
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale!r}")
    return _gaussian_cached(patch, sig)
