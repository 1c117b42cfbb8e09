"""Cheap, seeded data augmentation on NumPy patches.

Shapes: image ``(M, *spatial)`` float32 (already normalised), label ``(*spatial)``; spatial is
``(Z, Y, X)`` or ``(Y, X)``. Rotations are by 90 degrees in the ``(Y, X)`` plane (the last two
axes), so no interpolation touches the labels.

A config's ``augment`` value selects the recipe: ``True``/``False``, a dict of
:class:`AugmentConfig` fields (optionally with ``kind: medical``): this module's per-patch recipe
(the default); ``{"kind": "scene", ...}``: the road-scene recipe on whole frames
(:mod:`atso_fast.train.scene_augment`: scale, crop, horizontal flip, colour jitter; applied as a
frame is sampled, so :func:`patch_augment` gives None for it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

__all__ = ["AugmentConfig", "augment_sample", "augment_kind", "patch_augment"]


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation switches and ranges.

    Attributes:
        flip: mirror each spatial axis with probability 0.5.
        rot90: rotate the (Y, X) plane by k * 90 degrees (k in 0..3 for square patches, else 0 or 2).
        scale: intensity multiplier range (applied with probability ``p_intensity``).
        shift: additive intensity range, in normalised units (with probability ``p_intensity``).
        noise_std: gaussian noise standard-deviation range (with probability ``p_noise``).
        p_intensity: probability of the scale/shift step.
        p_noise: probability of the noise step.
    """

    flip: bool = True
    rot90: bool = True
    scale: tuple[float, float] = (0.9, 1.1)
    shift: tuple[float, float] = (-0.1, 0.1)
    noise_std: tuple[float, float] = (0.0, 0.1)
    p_intensity: float = 0.5
    p_noise: float = 0.3

    def __post_init__(self) -> None:
        for name in ("scale", "shift", "noise_std"):
            lo, hi = (float(v) for v in getattr(self, name))
            if lo > hi:
                raise ValueError(f"augment {name} must be (lo, hi) with lo <= hi, got {getattr(self, name)}")
            object.__setattr__(self, name, (lo, hi))
        for name in ("p_intensity", "p_noise"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"augment {name} must be in [0, 1], got {getattr(self, name)}")

    @classmethod
    def from_value(cls, value: AugmentConfig | dict[str, Any] | bool | None) -> AugmentConfig | None:
        """Coerce a config value: ``False``/``None`` -> no augmentation, ``True`` -> defaults, dict -> config."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"augment must be a bool, a dict or AugmentConfig, got {value!r}")
        if augment_kind(value) == "scene":
            raise ValueError(
                "augment kind 'scene' is the road-scene recipe (atso_fast.train.scene_augment), not AugmentConfig"
            )
        value = {k: v for k, v in value.items() if k != "kind"}
        unknown = set(value) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown augment options {sorted(unknown)}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists for ranges), for configs and checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def augment_kind(value: Any) -> str | None:
    """``"scene"`` or ``"medical"`` for a config's ``augment`` value, None for no augmentation.

    Raises:
        ValueError: a dict whose ``kind`` is neither.
    """
    if value is None or value is False:
        return None
    kind = value.get("kind", "medical") if isinstance(value, dict) else "medical"
    if kind not in ("medical", "scene"):
        raise ValueError(f"augment kind must be 'medical' or 'scene', got {kind!r}")
    return kind


def patch_augment(value: AugmentConfig | dict[str, Any] | bool | None) -> AugmentConfig | None:
    """The per-patch augmentation of a config's ``augment`` value (:meth:`AugmentConfig.from_value`);
    None for none and for the road-scene kind (whole frames are augmented as they are sampled)."""
    return None if augment_kind(value) == "scene" else AugmentConfig.from_value(value)


def augment_sample(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    config: AugmentConfig,
    *,
    channels: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply random flips, in-plane 90-degree rotations, intensity scale/shift and noise.

    Args:
        image: ``(M, *spatial)`` float32.
        label: ``(*spatial)`` integer labels (spatial part of ``image.shape``).
        rng: the only source of randomness.
        config: what to apply.
        channels: intensity changes and noise touch only the first ``channels`` channels (default
            all); the others (e.g. soft targets carried along) are only flipped and rotated.

    Returns:
        ``(image, label)``, new C-contiguous arrays of the same shapes.

    Raises:
        ValueError: shapes disagree.
    """
    if image.shape[1:] != label.shape:
        raise ValueError(f"image (M, *spatial) and label (*spatial) disagree: {image.shape} vs {label.shape}")
    nd = label.ndim
    if config.flip:
        axes = [a for a in range(nd) if rng.random() < 0.5]
        if axes:
            image, label = np.flip(image, tuple(a + 1 for a in axes)), np.flip(label, tuple(axes))
    if config.rot90 and nd >= 2:
        square = label.shape[-1] == label.shape[-2]
        k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
        if k:
            image, label = np.rot90(image, k, axes=(-2, -1)), np.rot90(label, k, axes=(-2, -1))
    image = np.array(image, dtype=np.float32, copy=True, order="C")
    intensity = image if channels is None else image[:channels]  # a view: edits land in image
    if rng.random() < config.p_intensity:
        intensity *= np.float32(rng.uniform(*config.scale))
        intensity += np.float32(rng.uniform(*config.shift))
    if rng.random() < config.p_noise:
        intensity += rng.normal(0.0, rng.uniform(*config.noise_std), size=intensity.shape).astype(np.float32)
    return image, np.ascontiguousarray(label)
