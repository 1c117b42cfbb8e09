"""NumPy reference of every native kernel: the oracle the tests compare ``atso_fast._C`` to.

Straightforward loops over windows, written for clarity, not speed. Shapes follow the kernel
contracts in ``atso_fast.kernels.native``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["accumulate", "bilinear_rows", "extract_patches", "finalize", "num_label_classes", "probabilities"]


def num_label_classes(channels: int) -> int:
    """Label classes for ``channels`` output channels (one sigmoid channel -> 2 classes)."""
    return max(int(channels), 2)


def _clip(origin: int, size: int, limit: int) -> tuple[int, int]:
    return max(origin, 0), min(origin + size, limit)


def extract_patches(
    volume: np.ndarray, origins: np.ndarray, patch_size, pad_value: float = 0.0, out_dtype=np.float32
) -> np.ndarray:
    """Windows ``(B, M, pz, py, px)`` from ``volume (M, Z, Y, X)``; outside -> ``pad_value``."""
    pz, py, px = (int(p) for p in patch_size)
    origins = np.asarray(origins, np.int64).reshape(-1, 3)
    out = np.full((len(origins), volume.shape[0], pz, py, px), pad_value, np.float32)
    for b, (oz, oy, ox) in enumerate(origins):
        z0, z1 = _clip(oz, pz, volume.shape[1])
        y0, y1 = _clip(oy, py, volume.shape[2])
        x0, x1 = _clip(ox, px, volume.shape[3])
        if z0 < z1 and y0 < y1 and x0 < x1:
            out[b, :, z0 - oz : z1 - oz, y0 - oy : y1 - oy, x0 - ox : x1 - ox] = volume[:, z0:z1, y0:y1, x0:x1]
    return out.astype(out_dtype)


def accumulate(
    acc: np.ndarray, wsum: np.ndarray, patches: np.ndarray, origins: np.ndarray, importance: np.ndarray, z0: int = 0
) -> None:
    """In place: ``acc (C, Zs, Y, X) += importance * patch`` and ``wsum += importance``.

    The slab holds volume rows ``[z0, z0 + Zs)``; windows are clipped to it. Windows are added
    one after another in batch order, the accumulator rounded to its dtype after each one.
    """
    _, zs, ny, nx = acc.shape
    pz, py, px = importance.shape
    for b, (oz, oy, ox) in enumerate(np.asarray(origins, np.int64).reshape(-1, 3)):
        a0, a1 = _clip(oz - z0, pz, zs)
        y0, y1 = _clip(oy, py, ny)
        x0, x1 = _clip(ox, px, nx)
        if a0 >= a1 or y0 >= y1 or x0 >= x1:
            continue
        win = (slice(a0 + z0 - oz, a1 + z0 - oz), slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox))
        dst = (slice(a0, a1), slice(y0, y1), slice(x0, x1))
        imp = importance[win]
        wsum[dst] += imp
        every = (slice(None),)  # all channels; + rather than (slice(None), *win), which mypy misreads as 3.11 syntax
        contrib = imp[None] * patches[b][every + win].astype(np.float32)
        acc[every + dst] = (acc[every + dst].astype(np.float32) + contrib).astype(acc.dtype)


def _blended(acc: np.ndarray, wsum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``acc / wsum`` float32 ``(C, ...)`` and the invalid voxels ``(...)``: zero or non-finite
    weight, or a non-finite value in any channel."""
    w = wsum.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        vals = acc.astype(np.float32) / w[None]
    return vals, ~(w > 0) | ~np.isfinite(w) | ~np.isfinite(vals).all(axis=0)


def finalize(
    acc: np.ndarray, wsum: np.ndarray, threshold: float = 0.0, ignore_index: int = 255, kind: str = "logits"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blended sums -> ``(labels, confidence, counts)``.

    Returns:
        labels (Zs, Y, X) uint8 (uint16 when classes or ignore_index exceed 255),
        confidence (Zs, Y, X) uint8 = round(max probability * 255), counts int64 of length
        K + 2 with K = max(C, 2): per-class voxels, voxels below threshold, invalid voxels
        (zero weight or non-finite), the last two labelled ``ignore_index``.
    """
    c = acc.shape[0]
    k = num_label_classes(c)
    vals, invalid = _blended(acc, wsum)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if c == 1:
            p = 1 / (1 + np.exp(-vals[0])) if kind == "logits" else vals[0]
            label = (p > 0.5).astype(np.int64)
            prob = np.where(p > 0.5, p, 1 - p).astype(np.float32)
        else:
            label = np.argmax(vals, axis=0)
            vmax = np.max(vals, axis=0)
            prob = (1 / np.exp(vals - vmax[None]).sum(axis=0)) if kind == "logits" else vmax
        invalid |= ~np.isfinite(prob)
        conf = np.clip(np.floor(np.nan_to_num(prob) * np.float32(255) + np.float32(0.5)), 0, 255)
    low = ~invalid & (prob < threshold)
    ldtype = np.uint8 if max(k - 1, ignore_index) <= 255 else np.uint16
    labels = np.where(invalid | low, ignore_index, label).astype(ldtype)
    confidence = np.where(invalid, 0, conf).astype(np.uint8)
    counts = np.zeros(k + 2, np.int64)
    keep = ~(invalid | low)
    counts[:k] = np.bincount(label[keep].ravel(), minlength=k)[:k]
    counts[k] = int(low.sum())
    counts[k + 1] = int(invalid.sum())
    return labels, confidence, counts


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 ``fma(a, b, c)``: the float64 product of two float32 values is exact; the float64
    sum then rounds once before the float32 rounding, which differs from a single rounding only
    when that first rounding lands exactly on a float32 tie (about 2**-29 of random inputs)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def bilinear_rows(rows: np.ndarray, y_taps, x_taps) -> np.ndarray:
    """``(C, R, Yt, Xt)`` float32 -> ``(C, R, Yn, Xn)``: per axis ``fma(t0, w0, t1 * w1)``, along x
    first, then y (aten's CPU ``upsample_bilinear2d`` arithmetic; ``resample_finalize``'s)."""
    (a0, a1, u0, u1), (b0, b1, v0, v1) = y_taps, x_taps
    rows = np.asarray(rows, np.float32)
    v0, v1 = np.asarray(v0, np.float32), np.asarray(v1, np.float32)
    u0, u1 = np.asarray(u0, np.float32)[:, None], np.asarray(u1, np.float32)[:, None]

    def along_x(lines: np.ndarray) -> np.ndarray:
        return _fma32(lines[..., b0], v0, lines[..., b1] * v1)

    with np.errstate(invalid="ignore", over="ignore"):
        t0, t1 = along_x(rows[:, :, a0]), along_x(rows[:, :, a1])
        return _fma32(t0, u0, t1 * u1)


def probabilities(acc: np.ndarray, wsum: np.ndarray, kind: str = "logits") -> np.ndarray:
    """Blended sums -> ``(C, Zs, Y, X)`` float32 probabilities, those :func:`finalize` decides on.

    ``kind="logits"``: softmax over channels, or for one channel the sigmoid of its logit (as
    ``e / (1 + e)`` with ``e = exp(-|v|)`` where the logit is not positive, so no overflow);
    ``"probabilities"``: the blended values. NaN in every channel of a voxel that
    :func:`finalize` counts invalid.
    """
    vals, invalid = _blended(acc, wsum)
    with np.errstate(invalid="ignore", over="ignore"):
        if kind != "logits":
            p = vals
        elif vals.shape[0] == 1:
            e = np.exp(-np.abs(vals))
            p = np.where(vals > 0, np.float32(1), e) / (1 + e)
        else:
            t = np.exp(vals - vals.max(axis=0, keepdims=True))
            p = t / t.sum(axis=0, keepdims=True)
    return np.where(invalid[None], np.float32(np.nan), p).astype(np.float32)
