"""Quality-control pictures: a scan's three orthogonal slices with its labels on top (PNG).

A person checking a bulk run looks at these, not at label volumes: each picture shows the axial,
coronal and sagittal slice through the labelled region's centre (the volume's centre when nothing
is labelled), the image windowed to its 1st-99th percentiles, each class in its own colour at
40% opacity, voxels scaled to their physical size. Pillow draws and encodes (it comes with
matplotlib, whose ``tab20`` colours are used).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from atso_fast.io.atomic import atomic_write_bytes

__all__ = ["overlay_png", "write_overlay"]

_ALPHA = 0.4
_HEIGHT = 256
"""Pixel height of each slice panel."""


def _colours(n: int) -> np.ndarray:
    from matplotlib import colormaps

    table = colormaps["tab20"](np.arange(20))[:, :3]
    return (table[np.arange(n) % 20] * 255).astype(np.uint8)


def _window(image: np.ndarray) -> np.ndarray:
    finite = image[np.isfinite(image)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    scaled = (np.nan_to_num(image, nan=lo) - lo) / max(hi - lo, 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def _centre(labels: np.ndarray, ignore_index: int) -> tuple[int, int, int]:
    found = np.argwhere((labels > 0) & (labels != ignore_index))
    if not found.size:
        return tuple(int(n) // 2 for n in labels.shape)  # type: ignore[return-value]
    return tuple(int(v) for v in np.median(found, axis=0))  # type: ignore[return-value]


def _panel(image: np.ndarray, labels: np.ndarray, row_mm: float, col_mm: float, ignore_index: int) -> np.ndarray:
    """One slice ``(rows, cols)`` as RGB, labels blended, flipped so rows grow upwards, scaled to
    its physical proportions."""
    from PIL import Image

    grey = _window(image)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    shown = (labels > 0) & (labels != ignore_index)
    colours = _colours(int(labels.max()) + 1).astype(np.float32)
    rgb[shown] = (1 - _ALPHA) * rgb[shown] + _ALPHA * colours[labels[shown]]
    picture = Image.fromarray(rgb[::-1].astype(np.uint8))
    width = max(1, round(_HEIGHT * labels.shape[1] * col_mm / max(labels.shape[0] * row_mm, 1e-6)))
    return np.asarray(picture.resize((width, _HEIGHT), Image.Resampling.NEAREST))


def overlay_png(image: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float] | None = None,
                ignore_index: int = 255) -> bytes:
    """PNG bytes of the three orthogonal slices of ``image (Z, Y, X)`` (or ``(M, Z, Y, X)``: the
    first channel) with ``labels (Z, Y, X)`` blended on top.

    Args:
        spacing: ``(z, y, x)`` mm, for the panels' proportions (default isotropic).
        ignore_index: label drawn as background.
    """
    from PIL import Image

    image = np.asarray(image, np.float32)
    image = image[0] if image.ndim == 4 else image
    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ")
    sz, sy, sx = spacing or (1.0, 1.0, 1.0)
    z, y, x = _centre(labels, ignore_index)
    panels = [_panel(image[z], labels[z], sy, sx, ignore_index),  # axial: y rows, x across
              _panel(image[:, y], labels[:, y], sz, sx, ignore_index),  # coronal: z up, x across
              _panel(image[:, :, x], labels[:, :, x], sz, sy, ignore_index)]  # sagittal: z up, y across
    gap = np.zeros((_HEIGHT, 4, 3), np.uint8)
    strip = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(strip).save(buffer, format="PNG")
    return buffer.getvalue()


def write_overlay(path: str | os.PathLike[str], image: np.ndarray, labels: np.ndarray,
                  spacing: tuple[float, float, float] | None = None, ignore_index: int = 255) -> Path:
    """:func:`overlay_png` written atomically to ``path``."""
    return atomic_write_bytes(path, overlay_png(image, labels, spacing, ignore_index))
