"""Training curves as a PNG next to ``metrics.jsonl``: what a person opens to see a run go.

Per round (round 0 is the warm-up): the mean training loss, the validation mean Dice, and the
pseudo-label Dice of each unlabelled subset where its truth is known. matplotlib draws (Agg
backend, no display needed).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

__all__ = ["CURVES_NAME", "curves_png"]

CURVES_NAME = "metrics.png"


def _series(history: Sequence[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {"train loss": [], "val mean Dice": []}
    for row in history:
        k = int(row.get("round", 0))
        loss = (row.get("train") or {}).get("loss")
        if loss is not None:
            series["train loss"].append((k, float(loss)))
        if row.get("val_mean_dice") is not None:
            series["val mean Dice"].append((k, float(row["val_mean_dice"])))
        for subset, monitor in sorted((row.get("monitor") or {}).items()):
            if isinstance(monitor, dict) and monitor.get("pseudo_dice") is not None:
                series.setdefault(f"pseudo Dice {subset}", []).append((k, float(monitor["pseudo_dice"])))
    return series


def curves_png(history: Sequence[dict[str, Any]], title: str = "") -> bytes:
    """PNG bytes: loss (left axis) and Dice curves (right panel) against the round."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = _series(history)
    figure = Figure(figsize=(9, 3.4), dpi=100)
    loss_axis, dice_axis = figure.subplots(1, 2)
    for axis, keys, label in (
        (loss_axis, ["train loss"], "loss"),
        (dice_axis, [k for k in series if "Dice" in k], "Dice"),
    ):
        for key in keys:
            if series[key]:
                rounds, values = zip(*series[key])
                axis.plot(rounds, values, marker="o", label=key)
        axis.set_xlabel("round (0: warm-up)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if any(series[k] for k in keys):
            axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
