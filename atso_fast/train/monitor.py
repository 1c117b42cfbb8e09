"""Measurements of a semi-supervised run: pooled Dice, foreground label change, and the
monitors of a relabelled part, each also as a streaming accumulator (one case at a time, so cases
on disk are never all in memory; the memory and disk stores use the same ones).

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
from typing import Any

import numpy as np

from atso_fast.train.data import Threshold, low_confidence
from atso_fast.train.losses import confusion_counts, dice_from_counts

__all__ = ["pooled_dice", "foreground_change", "PooledDice", "ForegroundChange", "PseudoLabelStats"]


class PooledDice:
    """:func:`pooled_dice`, one case at a time: :meth:`add` each ``(pred, truth)`` pair, then
    :meth:`result`.

    Args:
        num_classes: C (background included).
        ignore_index: voxels where either map equals it are left out.
    """

    def __init__(self, num_classes: int, *, ignore_index: int | None = None) -> None:
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        self.counts: Any = 0
        self.cases = 0

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        """Count one case (label maps of equal shape; ValueError otherwise)."""
        self.counts = self.counts + confusion_counts(pred, truth, self.num_classes, ignore_index=self.ignore_index)
        self.cases += 1

    def result(self) -> tuple[list[float], float]:
        """``(per_class, mean_fg)`` as :func:`pooled_dice` (``([], nan)`` before any case)."""
        if not self.cases:
            return [], math.nan
        per_class = dice_from_counts(self.counts)
        fg = per_class[1:][~np.isnan(per_class[1:])]
        return [float(v) for v in per_class], float(fg.mean()) if fg.size else math.nan


class ForegroundChange:
    """:func:`foreground_change`, one case at a time: :meth:`add` each ``(old, new)`` pair, then
    :meth:`result`.

    Args:
        ignore_index: voxels ignored in either map are left out.
    """

    def __init__(self, *, ignore_index: int | None = None) -> None:
        self.ignore_index = ignore_index
        self.changed = self.union = 0

    def add(self, old: np.ndarray, new: np.ndarray) -> None:
        """Count one case (label maps of equal shape; ValueError otherwise)."""
        a, b = np.asarray(old), np.asarray(new)
        if a.shape != b.shape:
            raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
        fg = (a > 0) | (b > 0)
        if self.ignore_index is not None:
            fg &= (a != self.ignore_index) & (b != self.ignore_index)
        self.union += int(np.count_nonzero(fg))
        self.changed += int(np.count_nonzero(fg & (a != b)))

    def result(self) -> float:
        """The changed fraction of the foreground union; NaN when there is none."""
        return self.changed / self.union if self.union else math.nan


class PseudoLabelStats:
    """The monitors of one relabelled part of U, one case at a time.

    Per part: the fraction of voxels whose label changed since the previous labels
    (``changed_fraction``), the foreground change since the previous labels and since M0's
    (``changed_fg``, ``changed_fg_m0``: :func:`foreground_change`), the mean confidence and the
    share of ignored voxels (below ``threshold`` or labelled ``ignore_index``), and, where every
    case's truth is known, the pooled Dice of the new labels (``pseudo_dice``) and of the previous
    ones (``pseudo_dice_before``). A statistic that needs previous labels, M0's labels or the
    truth is NaN (or absent, for the Dice) unless every case has them.

    Args:
        num_classes: C.
        ignore_index: label of ignored voxels.
        threshold: the confidence threshold(s) of :func:`~atso_fast.train.data.low_confidence`.
    """

    def __init__(self, num_classes: int, *, ignore_index: int, threshold: Threshold) -> None:
        self.ignore_index, self.threshold = int(ignore_index), threshold
        self.total = self.changed = self.ignored = 0
        self.confidence = 0.0
        self.has_previous = self.has_m0 = self.has_truth = True
        self.fg, self.fg_m0 = ForegroundChange(ignore_index=ignore_index), ForegroundChange(ignore_index=ignore_index)
        self.dice = PooledDice(num_classes, ignore_index=ignore_index)
        self.dice_before = PooledDice(num_classes, ignore_index=ignore_index)

    def add(
        self,
        labels: np.ndarray,
        confidence: np.ndarray,
        *,
        previous: np.ndarray | None = None,
        m0: np.ndarray | None = None,
        truth: np.ndarray | None = None,
    ) -> None:
        """One case: its new ``labels`` and ``confidence`` (uint8, max probability x 255), its
        previous labels, M0's labels and its truth where they exist."""
        labels, confidence = np.asarray(labels), np.asarray(confidence)
        self.total += labels.size
        self.confidence += float(confidence.sum(dtype=np.float64))
        ignored = low_confidence(labels, confidence, self.threshold) | (labels == self.ignore_index)
        self.ignored += int(np.count_nonzero(ignored))
        self.has_previous = self.has_previous and previous is not None
        if self.has_previous and previous is not None:
            previous = np.asarray(previous)
            self.changed += int(np.count_nonzero(labels != previous))
            self.fg.add(previous, labels)
        self.has_m0 = self.has_m0 and m0 is not None
        if self.has_m0 and m0 is not None:
            self.fg_m0.add(m0, labels)
        self.has_truth = self.has_truth and truth is not None
        if self.has_truth and truth is not None:
            self.dice.add(labels, truth)
            if self.has_previous and previous is not None:
                self.dice_before.add(previous, truth)

    def result(self) -> dict[str, float]:
        """The statistics (see the class)."""
        total = max(self.total, 1)
        stats = {
            "changed_fraction": self.changed / total if self.has_previous else math.nan,
            "changed_fg": self.fg.result() if self.has_previous else math.nan,
            "changed_fg_m0": self.fg_m0.result() if self.has_m0 else math.nan,
            "mean_confidence": self.confidence / (255.0 * total),
            "ignored_fraction": self.ignored / total,
        }
        if self.has_truth and self.dice.cases:
            stats["pseudo_dice"] = self.dice.result()[1]
            if self.has_previous:
                stats["pseudo_dice_before"] = self.dice_before.result()[1]
        return stats


def pooled_dice(
    preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], num_classes: int, *, ignore_index: int | None = None
) -> tuple[list[float], float]:
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
    acc = PooledDice(num_classes, ignore_index=ignore_index)
    for pred, truth in zip(preds, truths):
        acc.add(pred, truth)
    return acc.result()


def foreground_change(
    old: Sequence[np.ndarray], new: Sequence[np.ndarray], *, ignore_index: int | None = None
) -> float:
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
    acc = ForegroundChange(ignore_index=ignore_index)
    for a, b in zip(old, new):
        acc.add(a, b)
    return acc.result()
