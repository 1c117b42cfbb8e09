"""Intensity normalisation policies, stored with the model package (``model.json``).

A policy is a plain dict so it round-trips through JSON:
    {"scheme": "none"}
    {"scheme": "zscore"}                         per-volume mean/std (MR, nnU-Net's default)
    {"scheme": "zscore", "use_mask": true}       ... over the nonzero mask only, the rest left as
                                                 is (nnU-Net's ``use_mask_for_norm``)
    {"scheme": "ct", "clip": [lo, hi], "mean": m, "std": s}   dataset-wide (nnU-Net's
                                                 CTNormalization: clip to the foreground's
                                                 0.5/99.5 percentiles, then its mean/std)
    {"scheme": "rescale_to_0_1"}                 (x - min) / max (nnU-Net's RescaleTo01)
    {"scheme": "rgb_to_0_1"}                     x / 255 (nnU-Net's RGBTo01)
    {"scheme": "rgb", "mean": [m0, m1, m2], "std": [s0, s1, s2]}   per channel (x - mean[m]) / std[m]
                                                 on 0-255 input (natural images; e.g.
                                                 :data:`IMAGENET_RGB`, the statistics that
                                                 ImageNet-pretrained encoders expect)
or a list of such dicts, one per input channel (nnU-Net normalises each channel by its own
scheme).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["IMAGENET_RGB", "channels_of", "normalize", "check_policy", "uses_mask", "SCHEMES", "ct_policy_from_samples"]

SCHEMES = ("none", "zscore", "ct", "rescale_to_0_1", "rgb_to_0_1", "rgb")
IMAGENET_RGB: dict[str, Any] = {"scheme": "rgb", "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
"""ImageNet's per-channel mean and std (R, G, B) on 0-255 input (torchvision's 0.485/0.229, ... x 255)."""
_EPS = 1e-8


def check_policy(policy: dict[str, Any] | list[dict[str, Any]] | None) -> dict[str, Any] | list[dict[str, Any]]:
    """Return a complete, validated copy of ``policy`` (``None`` means ``{"scheme": "none"}``;
    a list holds one policy per input channel).

    Raises:
        ValueError: unknown scheme or missing/invalid parameters.
    """
    if policy is None:
        return {"scheme": "none"}
    if isinstance(policy, (list, tuple)):
        if not policy:
            raise ValueError("normalization list must hold one policy per input channel, got []")
        return [_check_one(p) for p in policy]
    return _check_one(policy)


def _check_one(policy: Any) -> dict[str, Any]:
    if not isinstance(policy, dict) or policy.get("scheme") not in SCHEMES:
        raise ValueError(f"normalization must be a dict with scheme in {SCHEMES}, got {policy!r}")
    out = dict(policy)
    if out["scheme"] == "ct":
        for key in ("clip", "mean", "std"):
            if key not in out:
                raise ValueError(f"normalization scheme 'ct' needs {key!r}, got {policy!r}")
        lo, hi = (float(v) for v in out["clip"])
        if not lo < hi or not float(out["std"]) > 0:
            raise ValueError(f"normalization 'ct' needs clip lo < hi and std > 0, got {policy!r}")
        if not all(math.isfinite(v) for v in (lo, hi, float(out["mean"]), float(out["std"]))):
            raise ValueError(f"normalization 'ct' needs finite clip, mean and std, got {policy!r}")
        out.update(clip=[lo, hi], mean=float(out["mean"]), std=float(out["std"]))
    if out["scheme"] == "rgb":
        out.update(_check_rgb(policy))
    if out["scheme"] == "zscore":
        use_mask = out.get("use_mask", False)
        if not isinstance(use_mask, bool):
            raise ValueError(f"normalization 'zscore' use_mask must be true or false, got {policy!r}")
        if not use_mask:
            out.pop("use_mask", None)  # the plain z-score keeps its one-key form
    return out


def _check_rgb(policy: dict[str, Any]) -> dict[str, list[float]]:
    try:
        mean, std = [float(v) for v in policy["mean"]], [float(v) for v in policy["std"]]
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"normalization 'rgb' needs lists 'mean' and 'std' (one number per channel), got {policy!r}"
        ) from None
    if not mean or len(mean) != len(std) or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise ValueError(
            f"normalization 'rgb' needs equally long, finite 'mean' and 'std' lists with std > 0, got {policy!r}"
        )
    return {"mean": mean, "std": std}


def channels_of(policy: dict[str, Any] | list[dict[str, Any]]) -> int | None:
    """The input channels a (checked) policy is made for: the list's length, the ``rgb`` scheme's
    channel count, or ``None`` (any)."""
    if isinstance(policy, list):
        return len(policy)
    return len(policy["mean"]) if policy["scheme"] == "rgb" else None


def uses_mask(policy: dict[str, Any] | list[dict[str, Any]] | None) -> bool:
    """Whether any channel's policy needs the nonzero mask (z-score with ``use_mask``)."""
    policy = check_policy(policy)
    return any(p.get("use_mask", False) for p in (policy if isinstance(policy, list) else [policy]))


def normalize(
    volume: np.ndarray, policy: dict[str, Any] | list[dict[str, Any]] | None, mask: np.ndarray | None = None
) -> np.ndarray:
    """Apply ``policy`` to ``volume`` (any shape, any real dtype) and return float32.

    For multi-channel volumes ``(M, Z, Y, X)`` a single policy's z-score is taken per channel; a
    list of policies applies ``policy[m]`` to channel ``m``.

    Args:
        volume: the image; ``(M, Z, Y, X)`` when ``policy`` is a list.
        policy: see the module docstring.
        mask: ``(Z, Y, X)`` bool, the nonzero region; required by ``zscore`` with ``use_mask``.

    Raises:
        ValueError: a list policy whose length is not the channel count, or a missing mask.
    """
    policy = check_policy(policy)
    vol = np.asarray(volume, dtype=np.float32)
    if isinstance(policy, list):
        if vol.ndim != 4 or vol.shape[0] != len(policy):
            raise ValueError(f"{len(policy)} channel policies for a volume of shape {vol.shape}")
        return np.stack([_normalize_one(ch, p, mask) for ch, p in zip(vol, policy)])
    if vol.ndim == 4 and policy["scheme"] == "zscore":
        return np.stack([_normalize_one(ch, policy, mask) for ch in vol])
    return _normalize_one(vol, policy, mask)


def _normalize_one(vol: np.ndarray, policy: dict[str, Any], mask: np.ndarray | None) -> np.ndarray:
    scheme = policy["scheme"]
    if scheme == "none":
        return vol
    if scheme == "ct":
        lo, hi = policy["clip"]
        out = np.clip(vol, lo, hi)
        out -= policy["mean"]
        out /= max(policy["std"], _EPS)
        return out
    if scheme == "rescale_to_0_1":
        out = vol - vol.min()
        out /= max(float(out.max()), _EPS)
        return out
    if scheme == "rgb_to_0_1":
        return vol / np.float32(255.0)
    if scheme == "rgb":
        return _rgb(vol, policy)
    if policy.get("use_mask"):
        if mask is None:
            raise ValueError("normalization 'zscore' with use_mask needs the nonzero mask")
        return _masked_zscore(vol, mask)
    return _zscore(vol)


def _rgb(vol: np.ndarray, policy: dict[str, Any]) -> np.ndarray:
    """``(M, ...)`` (or one channel of any shape when the policy has one) minus ``mean[m]``, over
    ``std[m]``."""
    mean, std = policy["mean"], policy["std"]
    if len(mean) == 1 and (vol.ndim != 4 or vol.shape[0] != 1):
        return (vol - np.float32(mean[0])) / np.float32(std[0])
    if vol.ndim != 4 or vol.shape[0] != len(mean):
        raise ValueError(f"normalization 'rgb' has {len(mean)} channel statistics for a volume of shape {vol.shape}")
    shape = (len(mean),) + (1,) * (vol.ndim - 1)
    return (vol - np.asarray(mean, np.float32).reshape(shape)) / np.asarray(std, np.float32).reshape(shape)


def _zscore(vol: np.ndarray) -> np.ndarray:
    mean = float(vol.mean(dtype=np.float64)) if vol.size else 0.0
    std = float(vol.std(dtype=np.float64)) if vol.size else 1.0
    return (vol - mean) / max(std, _EPS)


def _masked_zscore(vol: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """z-score inside ``mask`` from the masked voxels' mean/std; voxels outside keep their value
    (nnU-Net's ZScoreNormalization with ``use_mask_for_norm``)."""
    out = np.array(vol, dtype=np.float32, copy=True)
    inside = vol[mask]
    if inside.size:
        mean, std = float(inside.mean(dtype=np.float64)), float(inside.std(dtype=np.float64))
        out[mask] = (inside - mean) / max(std, _EPS)
    return out


def ct_policy_from_samples(volumes: list[np.ndarray], labels: list[np.ndarray] | None = None) -> dict[str, Any]:
    """nnU-Net's CT scheme: clip to the 0.5/99.5 percentiles of foreground voxels, then z-score.

    Foreground is ``label > 0`` where labels are given, else all voxels.
    """
    if not volumes:
        raise ValueError("ct_policy_from_samples needs at least one volume")
    samples = []
    for i, vol in enumerate(volumes):
        mask = labels[i] > 0 if labels is not None else np.ones(vol.shape, bool)
        values = np.asarray(vol, np.float32)[mask]
        samples.append(values if values.size else np.asarray(vol, np.float32).ravel())
    allv = np.concatenate(samples)
    lo, hi = np.percentile(allv, [0.5, 99.5])
    clipped = np.clip(allv, lo, hi)
    return _check_one(
        {
            "scheme": "ct",
            "clip": [float(lo), float(hi)],
            "mean": float(clipped.mean()),
            "std": float(max(clipped.std(), 1e-8)),
        }
    )
