"""``atso_fast/train/recorded.py`` (what the demo quotes) is tied to the experiment JSON it was
generated from: every arm mean and every contrast must be that file's, rounded as recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atso_fast.train.recorded import RECORDED

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
_KEEP = ("a", "b", "mean", "ci_low", "ci_high", "p_holm", "n")


def _rows(contrasts):
    return [{k: round(v, 4) if isinstance(v, float) else v for k, v in c.items() if k in _KEEP} for c in contrasts]


@pytest.mark.parametrize("key", sorted(RECORDED))
def test_recorded_entries_match_their_experiment_json(key):
    entry = RECORDED[key]
    record = json.loads((RESULTS / entry["source"]).read_text())
    summary = record["summary"]
    assert entry["seeds"] == len(record["results"]) and entry["date"] == record["meta"]["date"]
    if "arms" in summary:
        assert entry["arms"] == {a: round(v["test_mean"], 4) for a, v in summary["arms"].items()}
    else:  # D2's primary endpoint: the per-case test Dice of each seed
        seeds = list(record["results"].values())
        assert entry["arms"] == {
            a: round(sum(r["arms"][a]["test_case_dice"] for r in seeds) / len(seeds), 4) for a in seeds[0]["arms"]
        }
        assert entry["decision"]["mean"] == round(summary["decision"]["mean"], 4)
    assert entry["contrasts"] == _rows(summary["contrasts"])
    assert entry["val_contrasts"] == _rows(summary["val_contrasts"])
