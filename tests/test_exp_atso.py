"""The ATSO experiment script's arm groups and pilot verdict (benchmarks/exp_atso_synthetic.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "exp_atso_synthetic.py"
_SPEC = importlib.util.spec_from_file_location("_exp_atso_synthetic", _PATH)
exp = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(exp)


def test_extra_arms_add_named_variants_to_a_group():
    arms = exp._arms("baselines", ["atso-lineage-k3", "atso-lineage-soft"])
    assert list(arms) == ["supervised", "self-training", "atso", "atso-lineage-k3", "atso-lineage-soft"]
    assert arms["atso-lineage-k3"] == {"method": "atso", "init": "lineage", "num_subsets": 3}
    assert exp._arms("main") == exp._group("main")
    with pytest.raises(SystemExit, match="unknown --extra-arms"):
        exp._arms("main", ["atso-typo"])


def _heads(pseudo_dice: dict[str, list[float]]) -> dict[int, dict]:
    """Two pilot seeds with the same per-round pseudo Dice (all U) per arm."""
    arms = {a: {"rounds": [{"pseudo_dice_all": d, "changed_fg_m0": 0.05} for d in ds]} for a, ds in pseudo_dice.items()}
    return {100: {"arms": arms}, 101: {"arms": arms}}


def test_pilot_verdict_names_a_stall_and_a_promising_task():
    heads = _heads({"self-training": [0.80, 0.801, 0.802], "atso": [0.80, 0.81, 0.82]})
    val = {"supervised": 0.70, "self-training": 0.72, "atso": 0.73, "oracle": 0.80}
    text = " ".join(exp.pilot_verdict(heads, val))
    assert "+0.0200" in text and "**stalls**" in text  # pseudo Dice rose only 0.002
    assert "atso 0.7300 (+0.0100 vs self-training" in text and "**promising**" in text


def test_pilot_verdict_without_headroom_or_gain_is_not_promising():
    heads = _heads({"self-training": [0.80, 0.82, 0.83], "atso": [0.80, 0.82, 0.83]})
    val = {"supervised": 0.70, "self-training": 0.72, "atso": 0.722, "oracle": 0.71}
    text = " ".join(exp.pilot_verdict(heads, val))
    assert "**does not stall**" in text and "**not promising**" in text
    assert exp.pilot_verdict(heads, {"atso": 0.7}) == []
