"""Sliding-window maths: window grid and gaussian importance map, two profiles.

``"monai"`` (the default) reproduces MONAI's ``sliding_window_inference``; ``"nnunet"`` reproduces
nnU-Net v2's ``compute_steps_for_sliding_window`` / ``compute_gaussian`` (see the end of this
module); :func:`grid_origins` and :func:`grid_importance` pick by profile name.

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
    "batch_bounds",
    "check_overlap",
    "padding_before",
    "scan_intervals",
    "window_starts",
    "sliding_window_origins",
    "gaussian_importance",
    "GRID_PROFILES",
    "nnunet_steps",
    "nnunet_origins",
    "nnunet_gaussian",
    "grid_origins",
    "grid_importance",
]

GRID_PROFILES = ("monai", "nnunet")
"""Window-grid profiles a model package may name (``model.json`` ``preprocessing.grid``)."""


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
    z, y, x = (float(o) for o in as_triple(overlap, "overlap"))
    for o in (z, y, x):
        if not 0.0 <= o < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    return z, y, x


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
    axes = [np.asarray(window_starts(s, int(r), st), np.int64) - p for s, r, st, p in zip(padded, roi, steps, pad)]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1).astype(np.int64)


def batch_bounds(n: int, batch_size: int, *, even: bool = True) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``ceil(n / batch_size)`` consecutive batches.

    ``even``: near-equal sizes, differing by at most one, the larger ones first (``n=10,
    batch_size=4`` gives sizes 4, 3, 3); False: MONAI's fixed-size batches, then the rest
    (4, 4, 2).

    Raises:
        ValueError: ``n < 0`` or ``batch_size < 1``.
    """
    if int(n) < 0 or int(batch_size) < 1:
        raise ValueError(f"batch_bounds needs n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    n, batch_size = int(n), int(batch_size)
    if not even:
        return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    count = -(-n // batch_size)
    if count == 0:
        return []
    size, extra = divmod(n, count)
    stops = np.cumsum([size + 1] * extra + [size] * (count - extra)).tolist()
    return list(zip([0, *stops[:-1]], stops))


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


# ------------------------------------------------------------------------------ nnU-Net profile
def nnunet_steps(image_size: Sequence[int], tile_size: Sequence[int], tile_step: Sequence[float]) -> list[list[int]]:
    """nnU-Net's ``compute_steps_for_sliding_window`` (per-axis ``tile_step`` allowed).

    Along each axis the first window starts at 0 and the last ends at the border; the steps in
    between are at most ``tile * tile_step`` apart, evenly spread and rounded
    (``np.round``, half to even, as nnU-Net).

    Raises:
        ValueError: an image axis smaller than the tile (pad first), or a step outside (0, 1].
    """
    _check_sizes(image_size, tile_size)
    out = []
    for size, tile, step in zip(image_size, tile_size, tile_step):
        size, tile, step = int(size), int(tile), float(step)
        if size < tile:
            raise ValueError(f"image size {tuple(image_size)} must be at least the tile {tuple(tile_size)}")
        if not 0 < step <= 1:
            raise ValueError(f"tile step must be in (0, 1], got {step}")
        num = int(np.ceil((size - tile) / (tile * step))) + 1
        actual = (size - tile) / (num - 1) if num > 1 else 99999999999
        out.append([int(np.round(actual * i)) for i in range(num)])
    return out


def nnunet_origins(image_size: Sequence[int], roi: Sequence[int], overlap: float | Sequence[float] = 0.5) -> np.ndarray:
    """Window origins ``(N, D)`` int64 of nnU-Net's predictor, in volume coordinates.

    The volume is (virtually) padded to at least the window, the content centred (nnU-Net's
    ``pad_nd_image``: ``pad_below = (roi - size) // 2``); windows start at
    :func:`nnunet_steps` of the padded size with ``tile_step = 1 - overlap``, in nnU-Net's
    order (first axis slowest). An axis whose window is one voxel deep (a 2D network's z) gets a
    window at every slice, as nnU-Net's 2D prediction does.
    """
    _check_sizes(image_size, roi)
    ov = as_triple(overlap, "overlap", len(roi))
    check_overlap(ov if len(ov) == 3 else ov[0])
    pad = padding_before(image_size, roi)
    padded = [max(int(s), int(r)) for s, r in zip(image_size, roi)]
    steps = nnunet_steps(padded, roi, [1.0 - o for o in ov])
    axes = [
        np.arange(int(s), dtype=np.int64) if int(r) == 1 else np.asarray(st, np.int64) - p
        for s, r, st, p in zip(image_size, roi, steps, pad)
    ]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1).astype(np.int64)


@lru_cache(maxsize=16)
def _nnunet_gaussian_cached(tile: tuple[int, ...], sigma_scale: float, value_scaling: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter1d

    # gaussian_filter of an impulse, one axis after the other: after axis k every non-zero voxel
    # is the product so far times one tap of axis k (the other terms of each sum are exact
    # zeros), so the outer product of the axes' 1D responses, multiplied in the same order, is
    # bit-identical, and costs milliseconds instead of 0.7 s for nnU-Net's 64 x 160 x 192 patch
    gmap = np.ones(())
    for t in tile:
        impulse = np.zeros(t)
        impulse[t // 2] = 1
        gmap = np.multiply.outer(gmap, gaussian_filter1d(impulse, t * sigma_scale, 0, mode="constant", cval=0))
    gmap /= np.max(gmap) / value_scaling
    # nnU-Net keeps the map in float16, converted by torch, which goes float64 -> float32 ->
    # float16 (two roundings): a direct cast differs by one float16 step on 104 voxels of the
    # 64 x 160 x 192 planner patch
    half = gmap.astype(np.float32).astype(np.float16)
    zero = half == 0
    if zero.any():
        half[zero] = half[~zero].min()
    out = half.astype(np.float32)
    out.setflags(write=False)
    return out


def nnunet_gaussian(tile_size: Sequence[int], sigma_scale: float = 1.0 / 8, value_scaling: float = 10.0) -> np.ndarray:
    """nnU-Net's ``compute_gaussian``: a unit impulse at ``tile // 2`` blurred by
    ``scipy.ndimage.gaussian_filter`` (sigma ``tile * sigma_scale``, constant border), scaled to
    a maximum of ``value_scaling``, rounded to float16 with zeros replaced by the smallest
    non-zero value; returned as float32 (read-only, cached), shape ``tile_size``."""
    tile = tuple(int(t) for t in tile_size)
    if not tile or min(tile) < 1:
        raise ValueError(f"tile_size must be positive integers, got {tuple(tile_size)!r}")
    if not sigma_scale > 0 or not value_scaling > 0:
        raise ValueError(f"sigma_scale and value_scaling must be > 0, got {sigma_scale!r}, {value_scaling!r}")
    return _nnunet_gaussian_cached(tile, float(sigma_scale), float(value_scaling))


def _check_profile(profile: str) -> str:
    if profile not in GRID_PROFILES:
        raise ValueError(f"grid profile must be one of {GRID_PROFILES}, got {profile!r}")
    return profile


def grid_origins(
    profile: str, image_size: Sequence[int], roi: Sequence[int], overlap: float | Sequence[float]
) -> np.ndarray:
    """Window origins ``(N, 3)`` of ``profile`` (``"monai"`` or ``"nnunet"``), z-major."""
    if _check_profile(profile) == "nnunet":
        return nnunet_origins(image_size, roi, overlap)
    return sliding_window_origins(image_size, roi, overlap)


def grid_importance(profile: str, window: Sequence[int]) -> np.ndarray:
    """The blending weights ``window3d`` float32 of ``profile`` for a network window ``window``
    (2 or 3 axes; a 2D window gets a unit z axis in front)."""
    window = tuple(int(w) for w in window)
    if _check_profile(profile) == "nnunet":
        gmap = nnunet_gaussian(window)
    else:
        gmap = gaussian_importance(window)
    return gmap.reshape((1,) * (3 - len(window)) + window)
