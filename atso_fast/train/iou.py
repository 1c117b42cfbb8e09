"""Intersection over union for semantic segmentation: per class, mean, per image and pooled.

The Cityscapes benchmark's number is the *pooled* mIoU: one confusion matrix summed over every
pixel of the dataset, IoU per class from it, the mean over classes. The per-image mIoU (each
image's IoU averaged over the classes it shows, then over images) weighs small objects in few
images differently; both are reported. Pixels whose ground truth is ``ignore_index`` (255: void
labels) count nowhere; a prediction that is no class (the relabeler's ignore label, say) on a
valid pixel is a miss for the true class and a false positive of none.

For class ``k``: ``IoU = TP / (TP + FP + FN)``; a class absent from both ground truth and
prediction has no IoU (NaN) and is left out of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["IoUMeter", "confusion_matrix", "iou_per_class", "mean_iou"]


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """``(C, C + 1)`` int64 counts: row = true class, column = predicted class, the last column
    predictions that are no class (outside ``[0, C)``); pixels with ``target == ignore_index``
    are left out.

    Raises:
        ValueError: shapes differ, non-integer arrays, ``num_classes < 1``, or a ground-truth value
            that is neither a class nor ``ignore_index``.
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must have one shape")
    if pred.dtype.kind not in "iub" or target.dtype.kind not in "iub":
        raise ValueError(f"pred and target must be integer label maps, got {pred.dtype} and {target.dtype}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    keep = target != ignore_index
    truth = target[keep].astype(np.int64)
    if truth.size and (truth.min() < 0 or truth.max() >= num_classes):
        bad = np.unique(truth[(truth < 0) | (truth >= num_classes)])[:5].tolist()
        raise ValueError(f"target holds {bad}: neither a class in [0, {num_classes}) nor ignore_index {ignore_index}")
    guess = pred[keep].astype(np.int64)
    guess = np.where((guess >= 0) & (guess < num_classes), guess, num_classes)
    counts = np.bincount(truth * (num_classes + 1) + guess, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """``(C,)`` float64 IoU of each class from a :func:`confusion_matrix` (NaN: class absent from
    both ground truth and prediction)."""
    confusion = np.asarray(confusion, np.int64)
    classes = confusion.shape[0]
    tp = np.diag(confusion[:, :classes]).astype(np.float64)
    fp = confusion[:, :classes].sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(ious: np.ndarray) -> float:
    """Mean of the defined (non-NaN) IoUs; NaN when none is."""
    ious = np.asarray(ious, np.float64)
    defined = ious[~np.isnan(ious)]
    return float(defined.mean()) if defined.size else float("nan")


@dataclass
class IoUMeter:
    """Accumulates per-image and pooled IoU over a set of images.

    ``update(pred, target)`` adds one image; ``result()`` returns ``{"pooled": {"iou": [C],
    "miou": m}, "per_image": {"miou": mean over images, "ious": [[C] per image],
    "mious": [per image]}}`` (NaN where undefined; JSON writers may need ``allow_nan``).
    """

    num_classes: int
    ignore_index: int = 255
    confusion: np.ndarray = field(init=False)
    image_ious: list[np.ndarray] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes + 1), np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Add one image; returns its per-class IoU."""
        matrix = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.confusion += matrix
        ious = iou_per_class(matrix)
        self.image_ious.append(ious)
        return ious

    def result(self) -> dict[str, dict[str, object]]:
        pooled = iou_per_class(self.confusion)
        mious = [mean_iou(i) for i in self.image_ious]
        return {
            "pooled": {"iou": pooled.tolist(), "miou": mean_iou(pooled)},
            "per_image": {
                "miou": mean_iou(np.asarray(mious)),
                "mious": mious,
                "ious": [i.tolist() for i in self.image_ious],
            },
        }
