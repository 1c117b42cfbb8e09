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

In training (``augment: {kind: scene, ...}`` in an ATSO config, options as
:class:`SceneAugmentConfig` but ``crop``, which is the training patch), :class:`ScenePatches`
samples from whole frames held in memory: a frame drawn uniformly, taken back from its
normalisation to 0-255, augmented, normalised again. It stands where a
:class:`~atso_fast.train.data.PatchSampler` would (same ``sample(rng)``; no foreground
oversampling: crops are placed uniformly, as published Cityscapes training does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from atso_fast.package.normalize import check_policy, normalize

__all__ = ["SceneAugmentConfig", "ScenePatches", "augment_scene", "resize_pair", "to_pixels"]


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

    @classmethod
    def from_value(cls, value: Any, crop: Sequence[int], ignore_index: int = 255) -> SceneAugmentConfig | None:
        """The recipe of a config's ``augment`` value when it is ``{"kind": "scene", ...}`` (its
        other keys: ``scale``, ``flip``, ``brightness``, ``contrast``, ``saturation``), with the
        training patch as ``crop``; None for any other value.

        Raises:
            ValueError: an unknown option (``crop`` included: it is the patch) or a value out of range.
        """
        if not isinstance(value, dict) or value.get("kind") != "scene":
            return None
        allowed = {f.name for f in fields(cls)} - {"crop", "ignore_index"}
        options = {k: v for k, v in value.items() if k != "kind"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(
                f"augment kind 'scene' takes {sorted(allowed)} (the crop is the patch_size), got unknown {unknown}"
            )
        if "scale" in options:
            options["scale"] = tuple(float(v) for v in options["scale"])
        if len(crop) != 2:
            raise ValueError(f"augment kind 'scene' crops 2D patches (h, w), got patch_size {tuple(crop)}")
        return cls(crop=(int(crop[0]), int(crop[1])), ignore_index=int(ignore_index), **options)


def resize_pair(image: np.ndarray, labels: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``image (3, H, W)`` bilinear (Pillow, float32 0-255) and ``labels (H, W)`` nearest neighbour
    (the source pixel under each output pixel's centre) to ``size (h, w)``."""
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    if (h, w) == labels.shape:
        return np.asarray(image, np.float32), np.asarray(labels)
    bands = [
        np.asarray(Image.fromarray(np.asarray(band, np.float32)).resize((w, h), Image.Resampling.BILINEAR))
        for band in image
    ]
    rows = np.minimum(((np.arange(h) + 0.5) * labels.shape[0] / h).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * labels.shape[1] / w).astype(np.int64), labels.shape[1] - 1)
    return np.stack(bands).astype(np.float32), np.asarray(labels)[rows[:, None], cols[None, :]]


def _crop(
    image: np.ndarray, labels: np.ndarray, crop: tuple[int, int], ignore: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    ch, cw = crop
    h, w = labels.shape
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        image = np.pad(image, ((0, 0), (0, ph), (0, pw)))
        labels = np.pad(labels, ((0, ph), (0, pw)), constant_values=ignore)
    y = int(rng.integers(0, labels.shape[0] - ch + 1))
    x = int(rng.integers(0, labels.shape[1] - cw + 1))
    return image[:, y : y + ch, x : x + cw], labels[y : y + ch, x : x + cw]


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
    return np.float32(0.299) * image[0] + np.float32(0.587) * image[1] + np.float32(0.114) * image[2]


def augment_scene(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, config: SceneAugmentConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented ``(image (3, h, w) float32 0-255, labels (h, w))`` (see the module docstring).

    Raises:
        ValueError: ``image`` is not ``(3, H, W)`` or ``labels`` not ``(H, W)`` of the same size.
    """
    config = config or SceneAugmentConfig()
    image, labels = np.asarray(image), np.asarray(labels)
    if image.ndim != 3 or image.shape[0] != 3 or labels.shape != image.shape[1:]:
        raise ValueError(
            f"expected image (3, H, W) and labels (H, W) of one size, got {image.shape} and {labels.shape}"
        )
    factor = rng.uniform(*config.scale)
    size = (max(1, round(labels.shape[0] * factor)), max(1, round(labels.shape[1] * factor)))
    image, labels = resize_pair(image, labels, size)
    image, labels = _crop(image, labels, config.crop, config.ignore_index, rng)
    if rng.random() < config.flip:
        image, labels = image[:, :, ::-1], labels[:, ::-1]
    image = _jitter(image, config, rng)
    out_labels = labels.astype(np.uint16 if labels.dtype == np.uint16 else np.uint8)
    return np.ascontiguousarray(image), np.ascontiguousarray(out_labels)


def to_pixels(image: np.ndarray, normalization: dict[str, Any]) -> np.ndarray:
    """Undo a picture's normalisation: ``image`` (any shape, channels first) back to 0-255 float32.

    Raises:
        ValueError: a policy that cannot be undone from the picture alone (only ``rgb``,
            ``rgb_to_0_1`` and ``none`` can).
    """
    policy = check_policy(normalization)
    if not isinstance(policy, dict):
        raise ValueError(f"road-scene augmentation undoes one policy for every channel, got a list {normalization!r}")
    scheme = policy["scheme"]
    image = np.asarray(image, np.float32)
    if scheme == "none":
        return image
    if scheme == "rgb_to_0_1":
        return image * np.float32(255.0)
    if scheme == "rgb":
        shape = (-1,) + (1,) * (image.ndim - 1)
        std, mean = (np.asarray(policy[k], np.float32).reshape(shape) for k in ("std", "mean"))
        return image * std + mean
    raise ValueError(
        f"road-scene augmentation works on 0-255 pictures: the normalization must be 'rgb', "
        f"'rgb_to_0_1' or 'none', got {normalization!r}"
    )


class ScenePatches:
    """Road-scene training samples from whole frames in memory (see the module docstring).

    Args:
        images: normalised frames ``(3, 1, H, W)`` float32.
        labels: ``(1, H, W)`` integer labels (trainIds; ``ignore_index`` left out of the loss).
        config: the recipe; its ``crop`` is the sample size ``(h, w)``.
        normalization: the policy ``images`` were normalised with (``rgb``, ``rgb_to_0_1`` or
            ``none``): samples are normalised with it again.

    Attributes:
        patch: ``(1, h, w)``; ``flat`` True: samples are ``(3, h, w)`` images and ``(h, w)`` labels.

    Raises:
        ValueError: no frame, mismatched counts or shapes, a policy that cannot be undone.
    """

    flat = True

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        config: SceneAugmentConfig,
        normalization: dict[str, Any],
    ) -> None:
        if not images or len(images) != len(labels):
            raise ValueError(f"ScenePatches needs as many labels as frames (>= 1), got {len(images)} and {len(labels)}")
        for image, label in zip(images, labels):
            if image.ndim != 4 or image.shape[:2] != (3, 1) or tuple(label.shape) != image.shape[1:]:
                raise ValueError(
                    f"ScenePatches needs frames (3, 1, H, W) and labels (1, H, W), got {image.shape} and {label.shape}"
                )
        to_pixels(images[0][:, :, :1, :1], normalization)  # refuses a policy it cannot undo, now
        self._images, self._labels = list(images), list(labels)
        self.config, self.normalization = config, dict(normalization)
        self.patch: tuple[int, ...] = (1, *config.crop)
        self.ignore_index = config.ignore_index

    @property
    def images(self) -> list[np.ndarray]:
        return self._images

    @property
    def labels(self) -> list[np.ndarray]:
        return self._labels

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One ``(image (3, h, w) float32 normalised, labels (h, w) uint8)``; ``rng`` is the only
        randomness (the frame first, then :func:`augment_scene`'s draws)."""
        index = int(rng.integers(len(self._images)))
        pixels = to_pixels(self._images[index][:, 0], self.normalization)
        image, labels = augment_scene(pixels, np.asarray(self._labels[index][0]), rng, self.config)
        return normalize(image[:, None], self.normalization)[:, 0], labels
