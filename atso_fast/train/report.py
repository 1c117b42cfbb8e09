"""Paired comparisons of training runs, and the plain-words summary the demo prints.

Statistics (paired over seeds: one value per seed and arm, all arms of a seed from one warm-up):
the mean difference with a 95% Student-t confidence interval, the Wilcoxon signed-rank p-value
(two-sided; exact for small samples without ties, scipy's default), and Holm's step-down
correction of the p-values over a family of contrasts.

The demo summary (:func:`demo_summary`) names the best method of the run, says by how much it
beat the others, and sets the run next to the recorded experiment (:mod:`atso_fast.train.recorded`,
written by ``benchmarks/exp_atso_synthetic.py --record``): the recorded paired differences with
their confidence intervals, and whether this run's differences fall inside them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from atso_fast.train.recorded import RECORDED

__all__ = ["paired_contrast", "holm", "contrast_table", "arm_name", "demo_summary", "demo_report"]


def paired_contrast(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95) -> dict[str, Any]:
    """Paired difference ``a - b`` over seeds: mean, SD, t confidence interval, Wilcoxon p-value.

    Args:
        a, b: one value per seed, same seed order (NaN-free).
        confidence: coverage of the interval.

    Returns:
        ``{"n", "mean", "sd", "ci_low", "ci_high", "p_wilcoxon", "wins"}`` (``wins``: seeds with
        ``a > b``). With fewer than 2 seeds the interval and p-value are NaN; with all differences
        zero the p-value is 1.

    Raises:
        ValueError: different lengths or a non-finite value.
    """
    xa, xb = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if xa.shape != xb.shape or xa.ndim != 1 or not (np.isfinite(xa).all() and np.isfinite(xb).all()):
        raise ValueError(
            f"paired_contrast needs two finite 1-D sequences of equal length, got {xa.tolist()} and {xb.tolist()}"
        )
    d = xa - xb
    n = len(d)
    out = {
        "n": n,
        "mean": float(d.mean()) if n else math.nan,
        "sd": math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "p_wilcoxon": math.nan,
        "wins": int((d > 0).sum()),
    }
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    out.update(sd=sd, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    out["p_wilcoxon"] = 1.0 if not np.any(d) else float(stats.wilcoxon(d).pvalue)
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given; NaN stays NaN and is not counted).

    The i-th smallest of m p-values is multiplied by ``m - i`` (i from 0), and the running maximum
    keeps the adjusted values monotone; values are capped at 1.
    """
    p = np.asarray(pvalues, np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        out[i] = running
    return [float(v) for v in out]


def contrast_table(values: Mapping[str, Sequence[float]], pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """:func:`paired_contrast` for each ``(a, b)`` pair, with Holm-adjusted p-values over the pairs.

    Args:
        values: arm name -> one value per seed (same seed order for every arm).
        pairs: contrasts ``a - b``.

    Returns:
        one dict per pair: ``{"a", "b", ...paired_contrast..., "p_holm"}``.
    """
    rows = [{"a": a, "b": b, **paired_contrast(values[a], values[b])} for a, b in pairs]
    for row, p in zip(rows, holm([r["p_wilcoxon"] for r in rows])):
        row["p_holm"] = p
    return rows


def _ranked(finals: Mapping[str, float]) -> list[tuple[str, float]]:
    return sorted(((m, v) for m, v in finals.items() if v is not None and math.isfinite(v)), key=lambda x: -x[1])


def demo_summary(
    finals: Mapping[str, float],
    like: Mapping[str, Any] | None = None,
    headline: Mapping[str, Any] | None = None,
    aliases: Mapping[str, str] | None = None,
    variants: Mapping[str, Any] | None = None,
    decisive: Mapping[str, Any] | None = None,
) -> str:
    """A few plain sentences on a demo run: who won, by how much, and against the records.

    Args:
        finals: method -> this run's final validation mean Dice.
        like: the record of a multi-seed experiment in this run's setting (its ``val_contrasts``,
            on the validation Dice the demo prints, are set next to this run's differences).
        headline: the record of the main experiment (its test-set ``contrasts`` are quoted).
        aliases: demo method -> recorded arm name (default: the same name).
        variants: the record of the variants experiment; the test contrast of its ATSO arm chosen
            on validation (``chosen_on_validation``) against self-training is stated in words.
        decisive: the record of the decisive experiment (issue 23's D2: ATSO as published, with
            its ``decision`` read by the rule fixed before the run), stated first.

        A record (:data:`atso_fast.train.recorded.RECORDED` values) is ``{"setting", "seeds", "date",
        "endpoint", "contrasts": [{"a", "b", "mean", "ci_low", "ci_high", "p_holm", "n"}, ...],
        "val_contrasts": [...]}``.

    Returns:
        the text (several lines).
    """
    ranked = _ranked(finals)
    if not ranked:
        return "No method produced a validation Dice in this run."
    best, best_v = ranked[0]
    lines = [
        f"Winner on this run: {best} (val mean Dice {best_v:.3f})"
        + "".join(f", {v - best_v:+.3f} for {m}" for m, v in ranked[1:])
        + "."
    ]
    lines.append(
        "One demo run is one seed on a small setting: differences of a few hundredths are within what "
        "changing the seed alone produces; the recorded multi-seed experiments below say what holds."
    )
    alias = dict(aliases or {})
    if decisive and decisive.get("decision"):
        d = decisive["decision"]
        lines.append(
            f"Recorded, decisive experiment ({decisive['setting']}; {decisive['seeds']} seeds, "
            f"{decisive['date']}; {decisive['endpoint']}): {d['a']} - {d['b']} {d['mean']:+.3f} "
            f"(CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}): {d['verdict']}."
        )
    if like:
        lines.append(
            f"Recorded, same setting ({like['setting']}; {like['seeds']} seeds, {like['date']}; paired "
            "differences of the final validation Dice):"
        )
        rows = [c for c in like["val_contrasts"] if _this_run_difference(finals, alias, c["a"], c["b"]) is not None]
        lines += [_contrast_line(c, _this_run_difference(finals, alias, c["a"], c["b"])) for c in rows]
    if headline:
        lines.append(
            f"Recorded, main experiment ({headline['setting']}; {headline['seeds']} seeds, "
            f"{headline['date']}; "
            f"{headline['endpoint']}):"
        )
        lines += [_contrast_line(c, None) for c in headline["contrasts"]]
        lines += _verdict(headline, "atso", "the main experiment")
        lines += _this_run_vs(headline, finals, alias)
    if variants and variants.get("chosen_on_validation"):
        lines += _verdict(
            variants,
            variants["chosen_on_validation"],
            f"the variants experiment ({variants['seeds']} seeds, {variants['date']}; the ATSO variant "
            "with the best validation Dice)",
        )
    if not like and not headline and not decisive:
        lines.append("No recorded multi-seed experiment to compare with (see benchmarks/RESULTS.md).")
    return "\n".join(lines)


def _verdict(record: Mapping[str, Any], arm: str, where: str) -> list[str]:
    """One plain sentence: did ``arm`` beat self-training in ``record`` (its test contrast's CI)?"""
    row = next((c for c in record.get("contrasts", []) if c["a"] == arm and c["b"] == "self-training"), None)
    if row is None:
        return []
    ci = f"{row['mean']:+.3f}, 95% CI {row['ci_low']:+.3f} to {row['ci_high']:+.3f}"
    if row["ci_low"] > 0:
        word = f"{arm} beat self-training ({ci})"
    elif row["ci_high"] < 0:
        word = f"{arm} did worse than self-training ({ci})"
    else:
        word = f"{arm} did not beat self-training: the difference ({ci}) is indistinguishable from 0"
    return [f"In {where}, {word}."]


def _this_run_vs(record: Mapping[str, Any], finals: Mapping[str, float], alias: Mapping[str, str]) -> list[str]:
    """This run's ATSO - self-training, beside (not judged against) the recorded interval: the
    demo's setting (3D, one seed, validation Dice) is not the experiment's."""
    row = next((c for c in record.get("contrasts", []) if c["a"] == "atso" and c["b"] == "self-training"), None)
    here = _this_run_difference(finals, alias, "atso", "self-training")
    if row is None or here is None:
        return []
    return [
        f"This run: atso - self-training {here:+.3f} (validation Dice, one seed, the demo's own setting); the "
        f"recorded interval is of another setting ({record.get('setting', 'the main experiment')}), so this run "
        "neither confirms nor contradicts it."
    ]


def _contrast_line(c: Mapping[str, Any], here: float | None) -> str:
    sig = "excludes 0" if c["ci_low"] > 0 or c["ci_high"] < 0 else "includes 0"
    text = (
        f"  {c['a']} - {c['b']}: {c['mean']:+.3f} (95% CI {c['ci_low']:+.3f} to {c['ci_high']:+.3f}, {sig}; "
        f"Holm p {c['p_holm']:.2g})"
    )
    if here is not None:
        text += (
            f"; this run: {here:+.3f}, "
            + ("inside" if c["ci_low"] <= here <= c["ci_high"] else "outside")
            + " that interval"
        )
    return text


def _this_run_difference(finals: Mapping[str, float], alias: Mapping[str, str], a: str, b: str) -> float | None:
    """This run's ``a - b`` where both recorded arms have a demo method mapped to them."""
    back = {arm: method for method, arm in alias.items()}
    ma, mb = back.get(a, a), back.get(b, b)
    va, vb = finals.get(ma), finals.get(mb)
    if va is None or vb is None or not (math.isfinite(va) and math.isfinite(vb)):
        return None
    return va - vb


def arm_name(config: Any) -> str:
    """The experiments' arm name of a run's config: ``atso`` (continue), ``atso-m0`` (restart from
    M0), ``atso-reinit``, ``atso-lineage``, ``self-training``, ``self-training-m0`` / ``-reinit``,
    ``supervised``, ``oracle``, ``mean-teacher``."""
    method, init = config.method, config.init
    if method == "atso":
        return {"continue": "atso", "m0": "atso-m0", "lineage": "atso-lineage", "reinit": "atso-reinit"}[init]
    if method == "self-training" and init in ("m0", "reinit"):
        return f"self-training-{init}"
    return method


def demo_report(
    runs: Mapping[str, Any], setting: str | None = None, main: str = "2d", variants: str = "2d_lineage"
) -> str:
    """:func:`demo_summary` of finished :class:`~atso_fast.train.atso.ATSO` runs (name -> run)
    against :data:`atso_fast.train.recorded.RECORDED` (``setting``: a record of the demo's own
    setting, none recorded so far; ``main``: the main experiment's, ``variants``: the variants
    experiment's), matching runs to recorded arms by their config."""
    finals = {name: run.history[-1]["val_mean_dice"] for name, run in runs.items()}
    recorded = RECORDED or {}
    return demo_summary(
        finals,
        recorded.get(setting) if setting else None,
        recorded.get(main),
        {name: arm_name(run.config) for name, run in runs.items()},
        recorded.get(variants),
        recorded.get("d2"),
    )
