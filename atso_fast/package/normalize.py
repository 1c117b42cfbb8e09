"""Intensity normalisation policies, stored with the model package (``model.json``).

A policy is a plain dict so it round-trips through JSON:
    {"scheme": "none"}
    {"scheme": "zscore"}                         per-volume mean/std (MR, nnU-Net's default)
    {"scheme": "ct", "clip": [lo, hi], "mean": m, "std": s}   dataset-wide (nnU-Net's CT scheme)
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["normalize", "check_policy", "SCHEMES", "ct_policy_from_samples"]

SCHEMES = ("none", "zscore", "ct")


def check_policy(policy: dict[str, Any] | None) -> dict[str, Any]:
    """Return a complete, validated copy of ``policy`` (``None`` means ``{"scheme": "none"}``).

    Raises:
        ValueError: unknown scheme or missing/invalid parameters.
    """
    if policy is None:
        return {"scheme": "none"}
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
        out.update(clip=[lo, hi], mean=float(out["mean"]), std=float(out["std"]))
    return out


def normalize(volume: np.ndarray, policy: dict[str, Any] | None) -> np.ndarray:
    """Apply ``policy`` to ``volume`` (any shape, any real dtype) and return float32.

    For multi-channel volumes ``(M, Z, Y, X)`` the z-score is taken per channel.
    """
    policy = check_policy(policy)
    vol = np.asarray(volume, dtype=np.float32)
    scheme = policy["scheme"]
    if scheme == "none":
        return vol
    if scheme == "ct":
        lo, hi = policy["clip"]
        out = np.clip(vol, lo, hi)
        out -= policy["mean"]
        out /= policy["std"]
        return out
    if vol.ndim == 4:
        return np.stack([_zscore(ch) for ch in vol])
    return _zscore(vol)


def _zscore(vol: np.ndarray) -> np.ndarray:
    mean = float(vol.mean(dtype=np.float64)) if vol.size else 0.0
    std = float(vol.std(dtype=np.float64)) if vol.size else 1.0
    return (vol - mean) / max(std, 1e-8)


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
    return check_policy({"scheme": "ct", "clip": [float(lo), float(hi)],
                         "mean": float(clipped.mean()), "std": float(max(clipped.std(), 1e-8))})
