"""Paired statistics (t interval, Wilcoxon, Holm) and the demo summary, against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from atso_fast.train.report import contrast_table, demo_summary, holm, paired_contrast


def test_paired_contrast_known_answer():
    a = [0.80, 0.82, 0.79, 0.85, 0.81]
    b = [0.78, 0.80, 0.80, 0.81, 0.79]
    d = np.subtract(a, b)
    r = paired_contrast(a, b)
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    assert r["n"] == 5 and r["wins"] == 4
    assert r["mean"] == pytest.approx(d.mean()) and r["sd"] == pytest.approx(d.std(ddof=1))
    assert r["ci_low"] == pytest.approx(d.mean() - half) and r["ci_high"] == pytest.approx(d.mean() + half)
    # exact signed-rank test: ranks of |d| = (0.02, 0.02, 0.01, 0.04, 0.02) -> W- = 1 (the one negative),
    # with ties scipy falls back to the normal approximation; just check it agrees with scipy
    assert r["p_wilcoxon"] == pytest.approx(stats.wilcoxon(d).pvalue)
    # all ten seeds positive: exact two-sided p = 2 / 2**10
    assert paired_contrast(np.arange(10) + 1.0, np.zeros(10))["p_wilcoxon"] == pytest.approx(2 / 1024)
    assert paired_contrast([1.0, 2.0], [1.0, 2.0])["p_wilcoxon"] == 1.0
    assert math.isnan(paired_contrast([1.0], [0.0])["ci_low"])
    with pytest.raises(ValueError, match="equal length"):
        paired_contrast([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        paired_contrast([1.0, math.nan], [1.0, 2.0])


def test_holm_known_answer():
    # sorted 0.01, 0.02, 0.04 -> 0.03, 0.04, 0.04 (monotone); NaN untouched and not counted
    assert holm([0.04, 0.01, math.nan, 0.02]) == pytest.approx([0.04, 0.03, math.nan, 0.04], nan_ok=True)
    assert holm([0.5, 0.9]) == [1.0, 1.0]


def test_contrast_table_and_demo_summary():
    values = {"atso": [0.8, 0.82, 0.81], "self-training": [0.79, 0.8, 0.8], "supervised": [0.7, 0.71, 0.7]}
    rows = contrast_table(values, [("atso", "self-training"), ("atso", "supervised")])
    assert [(r["a"], r["b"]) for r in rows] == [("atso", "self-training"), ("atso", "supervised")]
    assert all(r["p_holm"] >= r["p_wilcoxon"] for r in rows)
    recorded = {
        "setting": "2D phantoms",
        "seeds": 3,
        "date": "2026-01-01",
        "endpoint": "test Dice",
        "val_contrasts": [
            {"a": "atso", "b": "self-training", "mean": 0.01, "ci_low": 0.005, "ci_high": 0.02, "p_holm": 0.03, "n": 3},
            {"a": "oracle", "b": "supervised", "mean": 0.1, "ci_low": 0.05, "ci_high": 0.15, "p_holm": 0.03, "n": 3},
        ],
    }
    headline = {**recorded, "contrasts": recorded["val_contrasts"]}
    text = demo_summary({"supervised": 0.6, "self-training": 0.65, "atso": 0.66}, recorded, headline)
    assert "Winner on this run: atso" in text and "-0.010 for self-training" in text
    assert "excludes 0" in text and "this run: +0.010, inside that interval" in text
    assert text.count("oracle - supervised") == 1  # the demo has no oracle: quoted in the headline only
    text = demo_summary(
        {"supervised": 0.7, "self-training": 0.65, "atso-m0": 0.6}, recorded, aliases={"atso-m0": "atso"}
    )
    assert "Winner on this run: supervised" in text and "this run: -0.050, outside" in text
    assert "No recorded" in demo_summary({"atso": 0.5})


def test_demo_summary_states_the_recorded_verdict_in_words():
    row = {
        "a": "atso",
        "b": "self-training",
        "mean": -0.001,
        "ci_low": -0.007,
        "ci_high": 0.004,
        "p_holm": 0.75,
        "n": 10,
    }
    headline = {
        "setting": "2D phantoms",
        "seeds": 10,
        "date": "2026-12-02",
        "endpoint": "test Dice",
        "contrasts": [row],
        "val_contrasts": [row],
    }
    win = {
        "a": "atso-lineage",
        "b": "self-training",
        "mean": 0.01,
        "ci_low": 0.002,
        "ci_high": 0.018,
        "p_holm": 0.04,
        "n": 10,
    }
    variants = {**headline, "contrasts": [win], "chosen_on_validation": "atso-lineage"}
    text = demo_summary({"atso": 0.7, "self-training": 0.71}, None, headline, variants=variants)
    assert "In the main experiment, atso did not beat self-training" in text
    assert "-0.001, 95% CI -0.007 to +0.004" in text
    assert "atso-lineage beat self-training (+0.010, 95% CI +0.002 to +0.018)" in text
    assert "This run: atso - self-training -0.010 (validation Dice" in text
    assert "of another setting (2D phantoms), so this run neither confirms nor contradicts it" in text
    worse = {**variants, "contrasts": [{**win, "mean": -0.01, "ci_low": -0.02, "ci_high": -0.001}]}
    assert "atso-lineage did worse than self-training" in demo_summary({"atso": 0.7}, None, None, variants=worse)


def test_demo_summary_states_the_decisive_experiment_first():
    d2 = {
        "setting": "2D phantoms",
        "seeds": 20,
        "date": "2026-12-06",
        "endpoint": "per-case Dice",
        "decision": {
            "a": "atso-reinit",
            "b": "self-training",
            "mean": -0.003,
            "ci_low": -0.03,
            "ci_high": 0.02,
            "verdict": "inconclusive",
        },
    }
    text = demo_summary({"atso": 0.7, "self-training": 0.71}, decisive=d2)
    line = next(x for x in text.splitlines() if x.startswith("Recorded, decisive"))
    assert "atso-reinit - self-training -0.003 (CI -0.030 to +0.020): inconclusive" in line
    assert "No recorded multi-seed" not in text
