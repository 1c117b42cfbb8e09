"""Segmentation losses and metrics with an ignore label.

Shapes: logits ``(N, C, *spatial)``; targets ``(N, *spatial)`` integer class indices, where
``ignore_index`` marks voxels that count for nothing (neither cross-entropy nor Dice), or soft
targets ``(N, C, *spatial)`` float probabilities, where a voxel whose row sums to 0 is ignored.
Metrics: per-case hard Dice (:func:`dice_per_class`) and Dice pooled over many cases
(:func:`confusion_counts` summed, then :func:`dice_from_counts`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "soft_dice_loss",
    "dice_ce_loss",
    "soft_target_loss",
    "dice_per_class",
    "confusion_counts",
    "dice_from_counts",
]


def _check_pair(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() < 3 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"expected logits (N, C, *spatial) and target (N, *spatial), got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    include_background: bool = False,
    smooth: float = 1e-5,
    batch_dice: bool = True,
) -> torch.Tensor:
    """``1 - mean soft Dice`` over classes, counting only voxels whose target is not ignored.

    Args:
        logits: ``(N, C, *spatial)`` raw scores (softmax is applied here).
        target: ``(N, *spatial)`` int, values in ``[0, C)`` or ``ignore_index``.
        ignore_index: label of voxels left out.
        include_background: average over class 0 too.
        smooth: added to numerator and denominator.
        batch_dice: pool the batch before the ratio (nnU-Net's ``batch_dice``); else per sample.

    Returns:
        scalar tensor.

    Raises:
        ValueError: shape mismatch, or fewer than 2 classes without background.
    """
    _check_pair(logits, target)
    num_classes = logits.shape[1]
    first = 0 if include_background else 1
    if num_classes - first < 1:
        raise ValueError(f"soft_dice_loss needs a foreground class, got C={num_classes}")
    valid = target != ignore_index
    probs = torch.softmax(logits.float(), dim=1) * valid.unsqueeze(1)
    onehot = F.one_hot(torch.where(valid, target, 0).long(), num_classes)
    onehot = onehot.movedim(-1, 1).to(probs.dtype) * valid.unsqueeze(1)
    dims = (0, *range(2, logits.dim())) if batch_dice else tuple(range(2, logits.dim()))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1.0 - dice[..., first:].mean()


def dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    include_background: bool = False,
    smooth: float = 1e-5,
    batch_dice: bool = True,
) -> torch.Tensor:
    """``ce_weight * CE + dice_weight * soft Dice loss``, both over non-ignored voxels only.

    A batch where every voxel is ignored gives 0 (still attached to the graph), not NaN, and
    nothing here synchronises with the device.

    Args:
        logits: ``(N, C, *spatial)``.
        target: ``(N, *spatial)`` int with ``ignore_index`` for left-out voxels.
        include_background, smooth, batch_dice: passed to :func:`soft_dice_loss` (same defaults).

    Returns:
        scalar tensor.
    """
    _check_pair(logits, target)
    target = target.long()
    count = (target != ignore_index).sum().clamp_min(1)
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum") / count
    dice = soft_dice_loss(
        logits,
        target,
        ignore_index=ignore_index,
        include_background=include_background,
        smooth=smooth,
        batch_dice=batch_dice,
    )
    return ce_weight * ce + dice_weight * dice


def soft_target_loss(
    logits: torch.Tensor, target: torch.Tensor, *, include_background: bool = False, smooth: float = 1e-5
) -> torch.Tensor:
    """Cross-entropy + soft Dice loss against probability targets (distillation from a teacher).

    With one-hot targets this equals :func:`dice_ce_loss` (batch Dice, background left out of the
    Dice term); a voxel whose target row sums to 0 is ignored by both terms.

    Args:
        logits: ``(N, C, *spatial)`` raw scores.
        target: ``(N, C, *spatial)`` float, each row a distribution over C or all zeros (ignored).
        include_background: average the Dice term over class 0 too.
        smooth: added to numerator and denominator of the Dice term.

    Returns:
        scalar tensor (0, still attached to the graph, when every voxel is ignored).

    Raises:
        ValueError: shape mismatch or no foreground class.
    """
    if logits.dim() < 3 or target.shape != logits.shape:
        raise ValueError(
            f"expected logits and soft targets both (N, C, *spatial), got {tuple(logits.shape)} "
            f"and {tuple(target.shape)}"
        )
    first = 0 if include_background else 1
    if logits.shape[1] - first < 1:
        raise ValueError(f"soft_target_loss needs a foreground class, got C={logits.shape[1]}")
    target = target.float()
    valid = (target.sum(1, keepdim=True) > 0).to(target.dtype)
    log_probs = torch.log_softmax(logits.float(), dim=1)
    ce = -(target * log_probs).sum() / valid.sum().clamp_min(1)
    probs = log_probs.exp() * valid
    dims = (0, *range(2, logits.dim()))
    dice = (2 * (probs * target).sum(dims) + smooth) / (probs.sum(dims) + target.sum(dims) + smooth)
    return ce + 1.0 - dice[first:].mean()


def confusion_counts(
    pred: np.ndarray, truth: np.ndarray, num_classes: int, *, ignore_index: int | None = None
) -> np.ndarray:
    """True positives, false positives and false negatives of each class of one case.

    Sum these over cases and call :func:`dice_from_counts` for Dice pooled over a set of cases
    (each voxel weighs the same, so a slice without a class does not count as a perfect or a
    zero score for it).

    Args:
        pred, truth: integer label arrays of the same shape.
        num_classes: C.
        ignore_index: voxels where ``truth`` or ``pred`` equals it are left out.

    Returns:
        ``(C, 3)`` int64: columns TP, FP, FN.

    Raises:
        ValueError: shape mismatch.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth shapes differ: {pred.shape} vs {truth.shape}")
    if ignore_index is not None:
        keep = (truth != ignore_index) & (pred != ignore_index)
        pred, truth = pred[keep], truth[keep]
    pred, truth = pred.ravel().astype(np.int64), truth.ravel().astype(np.int64)
    ok = (pred < num_classes) & (truth < num_classes)
    joint = np.bincount(pred[ok] * num_classes + truth[ok], minlength=num_classes * num_classes)
    joint = joint.reshape(num_classes, num_classes)  # [pred, truth]
    tp = np.diag(joint)
    return np.stack([tp, joint.sum(1) - tp, joint.sum(0) - tp], axis=1).astype(np.int64)


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """Dice ``2 TP / (2 TP + FP + FN)`` per class from ``(C, 3)`` counts; NaN where the class is
    absent from both prediction and truth."""
    counts = np.asarray(counts, dtype=np.float64)
    denom = 2 * counts[:, 0] + counts[:, 1] + counts[:, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * counts[:, 0] / np.maximum(denom, 1), np.nan)


def dice_per_class(
    pred: np.ndarray, truth: np.ndarray, num_classes: int, *, ignore_index: int | None = None
) -> np.ndarray:
    """Hard Dice of each class of one case.

    Args:
        pred, truth: integer label arrays of the same shape.
        num_classes: C.
        ignore_index: voxels where ``truth`` or ``pred`` equals it are left out.

    Returns:
        ``(C,)`` float64; NaN for a class absent from both ``pred`` and ``truth``.

    Raises:
        ValueError: shape mismatch.
    """
    return dice_from_counts(confusion_counts(pred, truth, num_classes, ignore_index=ignore_index))
