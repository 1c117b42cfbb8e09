"""``atso-fast train`` and ``atso-fast demo --quick`` end to end, on CPU."""

from __future__ import annotations

import json

import pytest

from atso_fast.cli import main
from atso_fast.datasets.synthetic import make_archive, phantom_num_classes
from atso_fast.train.cli import load_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _write_config(tmp_path, **extra) -> str:
    make_archive(tmp_path / "data", 5, num_labelled=2, num_val=1, shape=(8, 16, 16), fmt="npy", seed=3)
    config = {
        "data": "data",
        "num_classes": phantom_num_classes(),
        "patch_size": [8, 16, 16],
        "model": {"base_channels": 4, "depth": 2},
        "warmup_steps": 3,
        "rounds": 2,
        "steps_per_round": 2,
        "out_dir": "run",
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()))
    return str(path)


def test_train_runs_resumes_and_reports(tmp_path, capsys):
    """The published setting from the command line: reinit students and a consolidated model."""
    config = _write_config(tmp_path, init="reinit", consolidate=True)
    assert main(["train", config, "--no-export", "--log-level", "WARNING"]) == 0
    out = capsys.readouterr().out
    assert "L+U1" in out and "L+U2" in out and "val Dice" in out and "L+U1+U2" in out
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(m) for m in metrics]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["stage"] for r in rows] == ["warm-up", "round", "round", "consolidate"]
    assert [r["student_from"] for r in rows[1:]] == ["theta0"] * 3 and rows[3]["model"] == "Mc"
    assert all(r["train"]["steps"] == 3 for r in rows)  # reinit: the warm-up's full schedule every time
    assert rows[3]["trained_on"] == ["L", "U1", "U2"] and rows[3]["relabelled"] == []
    # resuming a finished run does no more work and reports the same rounds
    assert main(["train", config, "--resume", "--no-export", "--log-level", "WARNING"]) == 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() == metrics


def test_train_config_errors(tmp_path, capsys):
    config = _write_config(tmp_path, method="co-training")
    assert main(["train", config, "--log-level", "WARNING"]) == 2
    assert "method must be one of" in capsys.readouterr().err
    no_out = tmp_path / "no_out.yaml"
    no_out.write_text("num_classes: 3\n")
    with pytest.raises(ValueError, match="no output folder"):
        load_config(no_out)
    assert load_config(no_out, out=tmp_path / "o")["out_dir"] == str(tmp_path / "o")


def test_demo_quick(tmp_path, capsys):
    """The demo end to end: archive, three methods, export, relabel engine over imagesUn."""
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for word in ("supervised", "self-training", "atso", "relabel engine", "volumes/s"):
        assert word in out
    assert (tmp_path / "model" / "model.json").is_file()
    manifest = (tmp_path / "relabelled" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 4 and all(json.loads(row)["status"] == "ok" for row in manifest)
