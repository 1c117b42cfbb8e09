"""Measurements of a semi-supervised run: pooled Dice and foreground label change.

Shapes: label maps are integer arrays of any (equal) shape, usually ``(Z, Y, X)``; ``ignore_index``
marks voxels that count for nothing. Class 0 is background.

Pooled Dice adds the true-positive, false-positive and false-negative counts of each class over
all cases before taking the ratio, so every voxel weighs the same and a slice that does not show a
class neither scores 1 nor 0 for it (the per-case mean would). The primary endpoint of the ATSO
experiments is the mean over foreground classes of this pooled Dice on the test cases.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from atso_fast.train.losses import confusion_counts, dice_from_counts

__all__ = ["pooled_dice", "foreground_change"]


def pooled_dice(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], num_classes: int, *,
                ignore_index: int | None = None) -> tuple[list[float], float]:
    """Dice of each class pooled over cases, and the mean over foreground classes.

    Args:
        preds, truths: label maps, pairwise of equal shape.
        num_classes: C (background included).
        ignore_index: voxels where either map equals it are left out.

    Returns:
        ``(per_class, mean_fg)``: ``per_class`` has C floats (NaN for a class absent from every
        prediction and truth), ``mean_fg`` averages classes 1.. that are not NaN (NaN if none,
        or if there are no cases).

    Raises:
        ValueError: different numbers of predictions and truths, or a shape mismatch.
    """
    if len(preds) != len(truths):
        raise ValueError(f"pooled_dice needs as many predictions as truths, got {len(preds)} and {len(truths)}")
    if not preds:
        return [], math.nan
    counts = sum(confusion_counts(p, t, num_classes, ignore_index=ignore_index) for p, t in zip(preds, truths))
    per_class = dice_from_counts(counts)
    fg = per_class[1:][~np.isnan(per_class[1:])]
    return [float(v) for v in per_class], float(fg.mean()) if fg.size else math.nan


def foreground_change(old: Sequence[np.ndarray], new: Sequence[np.ndarray], *,
                      ignore_index: int | None = None) -> float:
    """Fraction of the voxels labelled foreground by ``old`` or by ``new`` whose label differs.

    Background that stays background is left out, so the number does not shrink as the image gets
    larger or the organs smaller (a change over all voxels is dominated by background). It equals
    ``1 - |agreeing foreground| / |foreground in either|``, pooled over the cases.

    Args:
        old, new: label maps, pairwise of equal shape.
        ignore_index: voxels ignored in either map are left out.

    Returns:
        the fraction in [0, 1]; NaN when neither map has any foreground (or there are no cases).

    Raises:
        ValueError: different numbers of maps or a shape mismatch.
    """
    if len(old) != len(new):
        raise ValueError(f"foreground_change needs as many old as new maps, got {len(old)} and {len(new)}")
    changed = union = 0
    for a, b in zip(old, new):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
        fg = (a > 0) | (b > 0)
        if ignore_index is not None:
            fg &= (a != ignore_index) & (b != ignore_index)
        union += int(np.count_nonzero(fg))
        changed += int(np.count_nonzero(fg & (a != b)))
    return changed / union if union else math.nan
