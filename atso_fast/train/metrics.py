"""Per-case segmentation metrics as the medical-imaging field reports them: Dice and HD95.

For every case and every foreground class ``c`` (``1 .. C-1``):

* **Dice** ``2 TP / (2 TP + FP + FN)`` from voxel counts (NumPy).
* **HD95** in mm: the 95th-percentile symmetric Hausdorff distance between the boundaries of the
  predicted and true masks, from :func:`monai.metrics.compute_hausdorff_distance` with
  ``percentile=95`` and the case's voxel spacing. MONAI takes the 95th percentile of each directed
  boundary-to-boundary distance set (linear interpolation, ``torch.quantile``) and returns the
  larger of the two. The surface distance is MONAI's on purpose: it is the well-kept reference
  implementation the field (and nnU-Net-era papers) report, so numbers here are comparable with
  theirs and no hand-written distance can drift from it.

Conventions:

* A class absent from both prediction and truth has Dice NaN and HD95 NaN; NaN is left out of
  every mean and SD (it is neither a success nor a failure).
* A class present in exactly one of them has Dice 0 (a real miss or a false alarm) and HD95 NaN:
  the distance to an empty surface is undefined (MONAI 1.6 returns NaN there and warns; some
  versions return inf). Such cases are not fed to MONAI at all; they are counted per class in
  ``hd95_missing`` so a report can say how many distances are absent and why.
* ``ignore_index`` marks truth voxels that count for nothing: they are set to background in both
  maps before either metric, so they add to no Dice count and to no surface.
* Means are over cases with a value; SDs are sample SDs (``ddof=1``), NaN with fewer than 2 values.

Label maps are integer arrays ``(Y, X)`` or ``(Z, Y, X)``; spacing is per axis in the same order.
NaN stays ``float('nan')`` in the result; converting it for strict JSON is the caller's job.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

__all__ = ["case_metrics", "format_metrics", "combine_case_metrics", "as_case_maps", "case_summary"]

HD95_PERCENTILE = 95.0


def case_metrics(
    preds: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    num_classes: int,
    *,
    spacing: Sequence[float] | Sequence[Sequence[float]] | float | None = None,
    ignore_index: int | None = None,
    hd95: bool = True,
) -> dict[str, Any]:
    """Dice and HD95 per case and foreground class, with means and SDs over cases.

    Args:
        preds: predicted label maps, each ``(Y, X)`` or ``(Z, Y, X)`` int, values in ``[0, C)``.
        truths: true label maps, same count and pairwise the same shape as ``preds``; values in
            ``[0, C)`` or ``ignore_index``.
        num_classes: ``C``, background included (``>= 2``).
        spacing: voxel size in mm per axis of the label maps: ``None`` (1 mm), one number (all
            axes), one sequence for all cases, or a sequence of per-case sequences.
        ignore_index: truth label whose voxels are removed from both maps; must lie outside
            ``[0, C)``.
        hd95: compute HD95 (the slow part); with ``False`` the HD95 entries are empty or NaN.

    Returns:
        ``{"cases", "dice_per_case", "hd95_per_case", "dice_mean", "dice_sd", "hd95_mean",
        "hd95_sd", "hd95_missing", "mean_dice", "mean_dice_sd", "mean_hd95", "mean_hd95_sd"}``;
        per-class lists have ``C - 1`` entries (class 1 first). ``mean_dice`` / ``mean_hd95``
        average the per-class means; ``mean_dice_sd`` / ``mean_hd95_sd`` are the SDs over cases of
        each case's class-averaged value.

    Raises:
        ValueError: different counts or shapes, ``num_classes < 2``, a map that is not 2D/3D or
            not integer, a label out of range, a bad ``ignore_index`` or spacing.
    """
    _check_inputs(preds, truths, num_classes, ignore_index)
    spacings = _case_spacings(spacing, [np.ndim(t) for t in truths])
    dice_rows, hd_rows = [], []
    missing = np.zeros(num_classes - 1, dtype=np.int64)
    for pred, truth, sp in zip(preds, truths, spacings):
        pred, truth = _drop_ignored(np.asarray(pred), np.asarray(truth), ignore_index)
        dice_rows.append(_case_dice(pred, truth, num_classes))
        if hd95:
            row, absent_in_one = _case_hd95(pred, truth, num_classes, sp)
            hd_rows.append(row)
            missing += absent_in_one
    return _summarise(dice_rows, hd_rows, missing, num_classes)


def format_metrics(m: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    """One log line: ``Dice 0.812 +- 0.051 (liver 0.930 +- 0.020, ...), HD95 4.1 +- 2.0 mm``.

    Args:
        m: a :func:`case_metrics` result.
        class_names: ``C - 1`` foreground names, or ``C`` names with background first; default
            ``class 1``, ``class 2``, ...

    Raises:
        ValueError: ``class_names`` of the wrong length.
    """
    n_fg = len(m["dice_mean"])
    names = [f"class {c}" for c in range(1, n_fg + 1)] if class_names is None else list(class_names)
    if len(names) == n_fg + 1:
        names = names[1:]
    if len(names) != n_fg:
        raise ValueError(f"class_names needs {n_fg} foreground names (or {n_fg + 1} with background), got {len(names)}")
    per_class = ", ".join(f"{name} {mu:.3f} +- {sd:.3f}" for name, mu, sd in zip(names, m["dice_mean"], m["dice_sd"]))
    line = f"Dice {m['mean_dice']:.3f} +- {m['mean_dice_sd']:.3f} ({per_class})"
    if m.get("hd95_per_case"):
        line += f", HD95 {m['mean_hd95']:.1f} +- {m['mean_hd95_sd']:.1f} mm"
        n_missing = int(sum(m["hd95_missing"]))
        if n_missing:
            line += f" ({n_missing} undefined: class in prediction or truth only)"
    return line


def _check_inputs(
    preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], num_classes: int, ignore_index: int | None
) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (background + a foreground class), got {num_classes!r}")
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index must lie outside the classes [0, {num_classes}), got {ignore_index}")
    if len(preds) != len(truths):
        raise ValueError(f"preds and truths must have the same number of cases, got {len(preds)} and {len(truths)}")
    for i, (pred, truth) in enumerate(zip(preds, truths)):
        pred, truth = np.asarray(pred), np.asarray(truth)
        if pred.shape != truth.shape:
            raise ValueError(f"case {i}: pred shape {pred.shape} != truth shape {truth.shape}")
        if pred.ndim not in (2, 3):
            raise ValueError(f"case {i}: label maps must be 2D (Y, X) or 3D (Z, Y, X), got shape {pred.shape}")
        _check_labels(pred, f"case {i}: pred", num_classes, None)
        _check_labels(truth, f"case {i}: truth", num_classes, ignore_index)


def _check_labels(labels: np.ndarray, what: str, num_classes: int, ignore_index: int | None) -> None:
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise ValueError(f"{what} must be an integer label map, got dtype {labels.dtype}")
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bad.any():
        allowed = f"[0, {num_classes})" + ("" if ignore_index is None else f" or {ignore_index}")
        raise ValueError(f"{what} has labels outside {allowed}: {np.unique(labels[bad])[:5].tolist()}")


def _case_spacings(
    spacing: Sequence[float] | Sequence[Sequence[float]] | float | None, ndims: list[int]
) -> list[tuple[float, ...]]:
    """One per-axis spacing tuple per case, from any accepted form of ``spacing``."""
    if spacing is None:
        return [(1.0,) * nd for nd in ndims]
    # float and int spelled out for the type checker; numbers.Real adds NumPy scalars
    if isinstance(spacing, (float, int, numbers.Real)):
        per_case: list[Any] = [[spacing] * nd for nd in ndims]
    else:
        items: list[float | Sequence[float]] = list(spacing)
        nested = any(np.ndim(s) > 0 for s in items)
        if nested and len(items) != len(ndims):
            raise ValueError(f"spacing gives {len(items)} per-case spacings for {len(ndims)} cases")
        per_case = items if nested else [items] * len(ndims)
    out = []
    for i, (sp, nd) in enumerate(zip(per_case, ndims)):
        try:
            values = tuple(float(v) for v in np.asarray(sp, dtype=float).ravel())
        except (TypeError, ValueError):
            values = ()
        if np.ndim(sp) != 1 or len(values) != nd or not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"case {i}: spacing must be {nd} positive finite numbers (one per axis), got {sp!r}")
        out.append(values)
    return out


def _drop_ignored(pred: np.ndarray, truth: np.ndarray, ignore_index: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Both maps as int64 with the ignored truth voxels set to background in each."""
    pred, truth = pred.astype(np.int64), truth.astype(np.int64)
    if ignore_index is not None:
        ignored = truth == ignore_index
        pred[ignored] = 0
        truth[ignored] = 0
    return pred, truth


def _case_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of classes ``1 .. C-1``; NaN where the class is in neither map."""
    confusion = np.bincount((pred * num_classes + truth).ravel(), minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes)  # [pred, truth]
    tp = np.diag(confusion).astype(np.float64)
    denom = confusion.sum(axis=0) + confusion.sum(axis=1)  # 2TP + FP + FN
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(denom > 0, 2.0 * tp / denom, np.nan)
    return dice[1:]


def _case_hd95(
    pred: np.ndarray, truth: np.ndarray, num_classes: int, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """HD95 (mm) of classes ``1 .. C-1`` and a 0/1 flag per class for "present in one map only".

    Only classes present in both maps go to MONAI, in one call with one channel each.
    """
    classes = np.arange(1, num_classes)
    in_pred = np.bincount(pred.ravel(), minlength=num_classes)[1:] > 0
    in_truth = np.bincount(truth.ravel(), minlength=num_classes)[1:] > 0
    row = np.full(num_classes - 1, np.nan)
    both = classes[in_pred & in_truth]
    if both.size:
        # (1, K, *spatial) one-hot of the K classes present in both maps
        shape = (1, both.size) + (1,) * pred.ndim
        onehot_pred = torch.from_numpy(pred[None, None] == both.reshape(shape))
        onehot_truth = torch.from_numpy(truth[None, None] == both.reshape(shape))
        with warnings.catch_warnings():
            # MONAI 1.5-1.6 warn about their own internal call to get_mask_edges on every use
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            hd = compute_hausdorff_distance(
                onehot_pred, onehot_truth, include_background=True, percentile=HD95_PERCENTILE, spacing=list(spacing)
            )
        row[both - 1] = hd[0].double().numpy()
    return row, (in_pred ^ in_truth).astype(np.int64)


def _mean_sd(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample SD (``ddof=1``) of the non-NaN values; NaN when too few."""
    kept = values[~np.isnan(values)]
    mean = float(kept.mean()) if kept.size else math.nan
    sd = float(kept.std(ddof=1)) if kept.size >= 2 else math.nan
    return mean, sd


def _row_means(table: np.ndarray) -> np.ndarray:
    """Mean over classes of each case's row, NaN entries left out (all-NaN row -> NaN)."""
    counts = (~np.isnan(table)).sum(axis=1)
    sums = np.where(np.isnan(table), 0.0, table).sum(axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _summarise(
    dice_rows: list[np.ndarray], hd_rows: list[np.ndarray], missing: np.ndarray, num_classes: int
) -> dict[str, Any]:
    n_fg = num_classes - 1
    out: dict[str, Any] = {"cases": len(dice_rows)}
    for key, rows in (("dice", dice_rows), ("hd95", hd_rows)):
        table = np.asarray(rows, dtype=np.float64).reshape(len(rows), n_fg)
        stats = [_mean_sd(table[:, c]) for c in range(n_fg)]
        out[f"{key}_per_case"] = table.tolist()
        out[f"{key}_mean"] = [mu for mu, _ in stats]
        out[f"{key}_sd"] = [sd for _, sd in stats]
        out[f"mean_{key}"] = _mean_sd(np.asarray(out[f"{key}_mean"]))[0]
        out[f"mean_{key}_sd"] = _mean_sd(_row_means(table))[1]
    out["hd95_missing"] = [int(v) for v in missing]
    return out


def combine_case_metrics(parts: Sequence[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """One :func:`case_metrics` result from several over disjoint cases (cases streamed one at a
    time, e.g. from disk)."""
    dice_rows = [np.asarray(row, np.float64) for p in parts for row in p["dice_per_case"]]
    hd_rows = [np.asarray(row, np.float64) for p in parts for row in p["hd95_per_case"]]
    missing = (
        np.sum([np.asarray(p["hd95_missing"], np.int64) for p in parts], axis=0)
        if parts
        else np.zeros(num_classes - 1, np.int64)
    )
    return _summarise(dice_rows, hd_rows, missing, num_classes)


def as_case_maps(labels: np.ndarray, spacing: Sequence[float] | None) -> tuple[np.ndarray, list[float] | None]:
    """A ``(1, Y, X)`` map (one 2D slice stored as a volume) as ``(Y, X)`` with its in-plane
    spacing, so its surface is a 2D contour; any other map unchanged."""
    labels = np.asarray(labels)
    if labels.ndim == 3 and labels.shape[0] == 1:
        return labels[0], None if spacing is None else [float(s) for s in spacing][-2:]
    return labels, None if spacing is None else [float(s) for s in spacing]


def case_summary(m: dict[str, Any]) -> dict[str, Any]:
    """The per-class means and SDs of a :func:`case_metrics` result, without the per-case rows
    (what a metrics row per round keeps)."""
    return {k: v for k, v in m.items() if not k.endswith("_per_case")}
