"""Quality-control pictures: a scan's three orthogonal slices with its labels on top (PNG).

A 2D frame (a depth-1 volume: a photo, a slice) is drawn once, at its own size: a colour frame
``(3, 1, H, W)`` in its colours, anything else windowed grey, the labels on top at 50%; with a
``palette`` (colours indexed by label value, e.g. the Cityscapes colours) every label but
``ignore_index`` is drawn, label 0 included (trainId 0 is road).

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

__all__ = ["frame_overlay", "overlay_png", "write_overlay"]

_ALPHA = 0.4
_HEIGHT = 256
"""Pixel height of each slice panel."""


def _colours(n: int) -> np.ndarray:
    from matplotlib import colormaps

    table = colormaps["tab20"](np.arange(20))[:, :3]
    return (table[np.arange(n) % 20] * 255).astype(np.uint8)


def _window(image: np.ndarray) -> np.ndarray:
    finite = image[np.isfinite(image)]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    scaled = (np.nan_to_num(image, nan=lo) - lo) / max(hi - lo, 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def _centre(labels: np.ndarray, ignore_index: int) -> tuple[int, int, int]:
    found = np.argwhere((labels > 0) & (labels != ignore_index))
    z, y, x = (int(n) // 2 for n in labels.shape) if not found.size else (int(v) for v in np.median(found, axis=0))
    return z, y, x


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


def frame_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    ignore_index: int = 255,
    palette: np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """``(H, W, 3)`` uint8: the frame ``image`` (``(3, H, W)`` colour 0-255, or ``(H, W)`` windowed
    grey) with ``labels (H, W)`` blended on top in ``palette`` colours (``(N, 3)`` uint8 indexed by
    label; default tab20 with label 0 left out)."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 3:
        rgb = np.clip(np.moveaxis(image, 0, -1).astype(np.float32), 0, 255)
    else:
        rgb = np.repeat(_window(np.asarray(image, np.float32))[..., None], 3, axis=2).astype(np.float32)
    if rgb.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ")
    if palette is None:
        shown = (labels > 0) & (labels != ignore_index)
        colours = _colours(int(labels.max()) + 1).astype(np.float32)
    else:
        colours = np.asarray(palette, np.float32).reshape(-1, 3)
        shown = (labels < len(colours)) & (labels != ignore_index)
    rgb[shown] = (1 - alpha) * rgb[shown] + alpha * colours[labels[shown]]
    return (rgb + 0.5).astype(np.uint8)


def overlay_png(
    image: np.ndarray,
    labels: np.ndarray,
    spacing: tuple[float, float, float] | None = None,
    ignore_index: int = 255,
    palette: np.ndarray | None = None,
) -> bytes:
    """PNG bytes of the three orthogonal slices of ``image (Z, Y, X)`` (or ``(M, Z, Y, X)``: the
    first channel) with ``labels (Z, Y, X)`` blended on top; a 2D frame (``Z`` = 1) is drawn
    whole instead (:func:`frame_overlay`: colour when it has 3 channels).

    Args:
        spacing: ``(z, y, x)`` mm, for the panels' proportions (default isotropic).
        ignore_index: label drawn as background.
        palette: ``(N, 3)`` uint8 colours indexed by label, for 2D frames (default tab20).
    """
    from PIL import Image

    labels = np.asarray(labels)
    if labels.ndim == 3 and labels.shape[0] == 1:
        image = np.asarray(image)
        frame = image[:, 0] if image.ndim == 4 and image.shape[0] == 3 else image.reshape(-1, *labels.shape)[0, 0]
        buffer = io.BytesIO()
        Image.fromarray(frame_overlay(frame, labels[0], ignore_index, palette)).save(buffer, format="PNG")
        return buffer.getvalue()
    image = np.asarray(image, np.float32)
    image = image[0] if image.ndim == 4 else image
    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ")
    sz, sy, sx = spacing or (1.0, 1.0, 1.0)
    z, y, x = _centre(labels, ignore_index)
    panels = [
        _panel(image[z], labels[z], sy, sx, ignore_index),  # axial: y rows, x across
        _panel(image[:, y], labels[:, y], sz, sx, ignore_index),  # coronal: z up, x across
        _panel(image[:, :, x], labels[:, :, x], sz, sy, ignore_index),
    ]  # sagittal: z up, y across
    gap = np.zeros((_HEIGHT, 4, 3), np.uint8)
    strip = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(strip).save(buffer, format="PNG")
    return buffer.getvalue()


def write_overlay(
    path: str | os.PathLike[str],
    image: np.ndarray,
    labels: np.ndarray,
    spacing: tuple[float, float, float] | None = None,
    ignore_index: int = 255,
    palette: np.ndarray | None = None,
) -> Path:
    """:func:`overlay_png` written atomically to ``path``."""
    return atomic_write_bytes(path, overlay_png(image, labels, spacing, ignore_index, palette))
