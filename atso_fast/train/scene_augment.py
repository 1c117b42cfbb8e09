"""Road-scene augmentation for natural images (the recipe of published Cityscapes training):
random scale, random crop, horizontal flip and colour jitter.

Never a vertical flip or a rotation: the sky is above the road in every driving frame, and a
network that saw upside-down streets learns less about real ones. Geometry first, on the 0-255
picture (bilinear) and the labels (nearest neighbour, so no label is invented), then colour on
the float picture; normalisation (``atso_fast.package.normalize``, e.g. ImageNet's) comes after.
Every random draw comes from the ``numpy.random.Generator`` passed in, in a fixed order, so one
seed gives one result.

Shapes: image ``(3, H, W)`` (uint8 or float, 0-255), labels ``(H, W)`` integer (trainIds);
output image ``(3, h, w)`` float32 0-255, labels ``(h, w)`` uint8 (uint16 kept), ``(h, w)`` the
crop. Where the scaled frame is smaller than the crop, the picture is padded with 0 and the labels
with ``ignore_index`` (mmsegmentation's rule).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SceneAugmentConfig", "augment_scene", "resize_pair"]


@dataclass(frozen=True)
class SceneAugmentConfig:
    """Ranges of the road-scene recipe.

    Attributes:
        crop: ``(h, w)`` output size.
        scale: range of the random resize factor (uniform; 0.5-2.0 as in DeepLab/mmseg).
        flip: probability of a horizontal flip.
        brightness, contrast, saturation: jitter factors drawn in ``[1 - v, 1 + v]`` (0: off).
        ignore_index: label of padded pixels.
    """

    crop: tuple[int, int] = (512, 1024)
    scale: tuple[float, float] = (0.5, 2.0)
    flip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    ignore_index: int = 255

    def __post_init__(self) -> None:
        if len(self.crop) != 2 or min(self.crop) < 1:
            raise ValueError(f"crop must be two positive sizes (h, w), got {self.crop!r}")
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be a range 0 < lo <= hi, got {self.scale!r}")
        if not 0 <= self.flip <= 1:
            raise ValueError(f"flip is a probability in [0, 1], got {self.flip!r}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")


def resize_pair(image: np.ndarray, labels: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``image (3, H, W)`` bilinear (Pillow, float32 0-255) and ``labels (H, W)`` nearest neighbour
    (the source pixel under each output pixel's centre) to ``size (h, w)``."""
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    if (h, w) == labels.shape:
        return np.asarray(image, np.float32), np.asarray(labels)
    bands = [np.asarray(Image.fromarray(np.asarray(band, np.float32)).resize((w, h), Image.Resampling.BILINEAR))
             for band in image]
    rows = np.minimum(((np.arange(h) + 0.5) * labels.shape[0] / h).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * labels.shape[1] / w).astype(np.int64), labels.shape[1] - 1)
    return np.stack(bands).astype(np.float32), np.asarray(labels)[rows[:, None], cols[None, :]]


def _crop(image: np.ndarray, labels: np.ndarray, crop: tuple[int, int], ignore: int,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    ch, cw = crop
    h, w = labels.shape
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        image = np.pad(image, ((0, 0), (0, ph), (0, pw)))
        labels = np.pad(labels, ((0, ph), (0, pw)), constant_values=ignore)
    y = int(rng.integers(0, labels.shape[0] - ch + 1))
    x = int(rng.integers(0, labels.shape[1] - cw + 1))
    return image[:, y:y + ch, x:x + cw], labels[y:y + ch, x:x + cw]


def _jitter(image: np.ndarray, config: SceneAugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation (in this order; factors drawn even when a step is off,
    so switching one off does not change the others' draws)."""
    b, c, s = (np.float32(rng.uniform(1 - v, 1 + v)) for v in (config.brightness, config.contrast, config.saturation))
    image = image * b
    mean = _grey(image).mean()
    image = (image - mean) * c + mean
    grey = _grey(image)
    image = grey + (image - grey) * s
    return np.clip(image, 0, 255).astype(np.float32)


def _grey(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma ``(H, W)`` of ``(3, H, W)`` RGB (what torchvision's jitter uses)."""
    return (np.float32(0.299) * image[0] + np.float32(0.587) * image[1] + np.float32(0.114) * image[2])


def augment_scene(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                  config: SceneAugmentConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One augmented ``(image (3, h, w) float32 0-255, labels (h, w))`` (see the module docstring).

    Raises:
        ValueError: ``image`` is not ``(3, H, W)`` or ``labels`` not ``(H, W)`` of the same size.
    """
    config = config or SceneAugmentConfig()
    image, labels = np.asarray(image), np.asarray(labels)
    if image.ndim != 3 or image.shape[0] != 3 or labels.shape != image.shape[1:]:
        raise ValueError(f"expected image (3, H, W) and labels (H, W) of one size, got {image.shape} and "
                         f"{labels.shape}")
    factor = rng.uniform(*config.scale)
    size = (max(1, round(labels.shape[0] * factor)), max(1, round(labels.shape[1] * factor)))
    image, labels = resize_pair(image, labels, size)
    image, labels = _crop(image, labels, config.crop, config.ignore_index, rng)
    if rng.random() < config.flip:
        image, labels = image[:, :, ::-1], labels[:, ::-1]
    image = _jitter(image, config, rng)
    out_labels = labels.astype(np.uint16 if labels.dtype == np.uint16 else np.uint8)
    return np.ascontiguousarray(image), np.ascontiguousarray(out_labels)
