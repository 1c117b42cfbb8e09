"""The MONAI baseline of the benchmarks: ``sliding_window_inference`` with a gaussian blend, as
MONAI scripts run it (not shipped in the package)."""

from __future__ import annotations

from typing import Any

import numpy as np

from atso_fast.bench.networks import CT_NORMALIZATION
from atso_fast.package.normalize import normalize

__all__ = ["monai_labels"]


def monai_labels(
    net: Any,
    volume: np.ndarray,
    *,
    window: tuple[int, ...],
    batch: int,
    overlap: float,
    device: str = "cpu",
    normalization: dict | None = None,
) -> np.ndarray:
    """The MONAI baseline: uint8 argmax of ``sliding_window_inference`` (gaussian, sigma 1/8).

    ``volume`` ``(Z, Y, X)`` in HU is normalised with ``normalization`` (default
    :data:`CT_NORMALIZATION`, the built-in package's policy) and run on ``device`` whole,
    accumulator included, as MONAI scripts do.
    """
    import torch
    from monai.inferers import sliding_window_inference

    policy = CT_NORMALIZATION if normalization is None else normalization
    x = torch.from_numpy(np.ascontiguousarray(normalize(volume, policy), dtype=np.float32))[None, None]
    with torch.inference_mode():
        logits = sliding_window_inference(
            x.to(device), tuple(window), int(batch), net, overlap=overlap, mode="gaussian", sigma_scale=0.125
        )
        return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
