"""The command line a new user (an nnU-Net user) expects (issue 14, items 11 and 12)."""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from test_archive import FakeRelabeler, make_archive

from atso_fast import __version__
from atso_fast.cli import main
from atso_fast.cli import relabel as relabel_cli

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
ENV.pop("PYTHONWARNINGS", None)


class Recorder(FakeRelabeler):
    """Stands in for the engine; records how the CLI built it."""

    seen: dict = {}

    def __init__(self, model_dir, **kwargs):
        super().__init__()
        Recorder.seen = {"model_dir": model_dir, **kwargs}


@pytest.fixture
def fake_engine(monkeypatch):
    Recorder.seen = {}
    monkeypatch.setattr(relabel_cli, "Relabeler", Recorder)
    return Recorder


def _cli(*args: str, stdin_pipe_to: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "atso_fast", *args]
    if stdin_pipe_to:
        cmd = ["bash", "-c", " ".join(f"'{c}'" for c in cmd) + f" | {stdin_pipe_to}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)


# ------------------------------------------------------------------------------ item 11
def test_nnunet_style_flags_and_positionals_are_both_accepted(tmp_path, fake_engine, capsys):
    make_archive(tmp_path / "in", n=3)
    model = str(tmp_path / "model")
    assert main(["relabel", "-m", model, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "a"), "--quiet"]) == 0
    assert fake_engine.seen["model_dir"] == model
    assert main(["relabel", model, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "b"), "--quiet"]) == 0
    assert main(["relabel", "--model", model, str(tmp_path / "in"), str(tmp_path / "c"), "--quiet"]) == 0
    assert (tmp_path / "c" / "manifest.jsonl").is_file()
    assert main(["relabel", model, str(tmp_path / "in"), str(tmp_path / "d"), "-o", str(tmp_path / "e")]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["relabel", model]) == 2
    assert "INPUT" in capsys.readouterr().err


def test_overlap_and_nnunet_step_size(tmp_path, fake_engine, capsys):
    make_archive(tmp_path / "in", n=3)
    base = ["relabel", str(tmp_path / "model"), str(tmp_path / "in")]
    assert main([*base, str(tmp_path / "a"), "--overlap", "0.25", "--quiet"]) == 0
    assert fake_engine.seen["overlap"] == 0.25
    assert main([*base, str(tmp_path / "b"), "-step_size", "0.75", "--quiet"]) == 0
    assert fake_engine.seen["overlap"] == pytest.approx(0.25)  # nnU-Net's step = 1 - overlap
    assert main([*base, str(tmp_path / "c"), "--quiet"]) == 0
    assert fake_engine.seen["overlap"] == 0.5
    assert main([*base, str(tmp_path / "d"), "--overlap", "0.3", "-step_size", "0.5"]) == 2
    assert main([*base, str(tmp_path / "d"), "-step_size", "1.5"]) == 2
    assert "step_size" in capsys.readouterr().err


def test_old_spellings_still_work(tmp_path, fake_engine):
    make_archive(tmp_path / "in", n=3)
    base = ["relabel", str(tmp_path / "model"), str(tmp_path / "in"), str(tmp_path / "o"), "--quiet"]
    assert main([*base, "-device", "cpu", "--num_parts", "2", "--part_id", "1", "-npp", "1", "-nps", "1"]) == 0
    assert main([*base, "--continue_prediction", "-num_parts", "2", "-part_id", "0"]) == 0
    assert main([*base, "--resume", "--num-parts", "1", "--part-id", "0"]) == 0


def _help_lines(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's help as formatted, keyed by its first option string."""
    formatter = parser._get_formatter()
    return {
        (a.option_strings or [a.dest])[0]: formatter._expand_help(a) if a.help else ""
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))
    }


@pytest.mark.parametrize("name", ["relabel", "export", "demo", "train"])
def test_every_option_has_help_with_its_default(name):
    from atso_fast.cli import export as export_cli
    from atso_fast.train import cli as train_cli

    parser = {
        "relabel": relabel_cli.build_parser,
        "export": export_cli.build_parser,
        "demo": train_cli.build_demo_parser,
        "train": train_cli.build_train_parser,
    }[name]()
    for option, text in _help_lines(parser).items():
        assert text.strip(), f"{name} {option}: no help text"
        if parser._option_string_actions.get(option) is not None:
            assert "default" in text, f"{name} {option}: help does not show the default: {text!r}"


def test_version_and_help_through_a_closed_pipe():
    done = _cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"atso-fast {__version__}"
    for args in (["-h"], ["relabel", "-h"], ["export", "--help"]):
        piped = _cli(*args, stdin_pipe_to="head -1")
        assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr, piped.stderr
        assert piped.stdout.startswith("usage: atso-fast")


def test_the_input_is_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(relabel_cli, "Relabeler", never)
    assert main(["relabel", str(tmp_path / "model"), str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing: no such file or folder" in err and "Traceback" not in err
    make_archive(tmp_path / "in", n=3)
    assert main(["relabel", str(tmp_path / "model"), str(tmp_path / "in"), str(tmp_path / "in" / "out")]) == 2
    assert "inside the input folder" in capsys.readouterr().err


def test_rerun_needs_resume_or_overwrite(tmp_path, fake_engine, capsys):
    make_archive(tmp_path / "in", n=3)
    argv = ["relabel", str(tmp_path / "model"), str(tmp_path / "in"), str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "2 cases already done here" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0 and main([*argv, "--resume"]) == 0
    assert main([*argv, "--resume", "--overwrite"]) == 2
    rows = (tmp_path / "o" / "manifest.jsonl").read_text().splitlines()
    assert sorted(json.loads(r)["case_id"] for r in rows) == ["case00", "vol"]


# ------------------------------------------------------------------------ export checkpoints
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real ``atso-fast train`` run (three warm-up steps): its runs/.../checkpoint.pt."""
    from atso_fast.datasets.synthetic import make_archive as make_phantoms
    from atso_fast.datasets.synthetic import phantom_num_classes

    root = tmp_path_factory.mktemp("train")
    make_phantoms(root / "data", 5, num_labelled=2, num_val=1, shape=(8, 16, 16), fmt="npy", seed=3)
    config = {
        "data": "data",
        "num_classes": phantom_num_classes(),
        "patch_size": [8, 16, 16],
        "model": {"base_channels": 4, "depth": 2},
        "warmup_steps": 2,
        "rounds": 1,
        "steps_per_round": 1,
        "out_dir": "runs/atso",
    }
    (root / "config.json").write_text(json.dumps(config))
    assert main(["train", str(root / "config.json"), "--no-export", "--log-level", "WARNING"]) == 0
    return root / "runs" / "atso" / "checkpoint.pt"


def test_export_takes_the_trainers_checkpoint(trained_run, tmp_path, capsys):
    from atso_fast.package import load_package

    assert main(["export", str(trained_run), str(tmp_path / "pkg")]) == 0
    pkg = load_package(tmp_path / "pkg")
    assert pkg.window == (8, 16, 16) and pkg.in_channels == 1 and pkg.normalization["scheme"] != "none"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_classes"] == pkg.num_classes
    from atso_fast.datasets.synthetic import phantom_class_names

    assert pkg.class_names == list(phantom_class_names())  # from the data's dataset.json, through training


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_export_never_unpickles_unless_trusted(tmp_path, capsys):
    import torch

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Evil(str(marker))}, evil)
    assert main(["export", str(evil), str(tmp_path / "pkg")]) == 2
    err = capsys.readouterr().err
    assert not marker.exists() and "--trust-pickle" in err and "Traceback" not in err
    module = tmp_path / "module.pt"
    torch.save(torch.nn.Conv3d(1, 2, 1), module)  # a whole pickled nn.Module
    assert main(["export", str(module), str(tmp_path / "pkg")]) == 2
    assert "pickled" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                str(module),
                str(tmp_path / "pkg"),
                "--trust-pickle",
                "--window",
                "4",
                "4",
                "4",
                "--classes",
                "2",
            ]
        )
        == 0
    )
    (tmp_path / "junk.pt").write_bytes(pickle.dumps([1, 2]) + b"garbage")
    assert main(["export", str(tmp_path / "junk.pt"), str(tmp_path / "p2")]) == 2
    assert "atso-fast export:" in capsys.readouterr().err


def test_export_help_says_what_checkpoints_it_takes():
    from atso_fast.cli import export as export_cli

    text = io.StringIO()
    export_cli.build_parser().print_help(text)
    assert "checkpoint.pt" in text.getvalue() and "--trust-pickle" in text.getvalue()


# ------------------------------------------------------------------------------ item 12
@pytest.mark.slow
def test_a_normal_relabel_run_prints_no_library_warnings(tmp_path):
    import torch

    from atso_fast.package import export_model

    conv = torch.nn.Conv3d(1, 3, kernel_size=1)
    model = export_model(conv.eval(), tmp_path / "model", window=(4, 4, 4), num_classes=3)
    make_archive(tmp_path / "in", n=3)
    for runtime in ("auto", "torch"):
        done = _cli("relabel", str(model), str(tmp_path / "in"), str(tmp_path / runtime), "--runtime", runtime)
        assert done.returncode == 0, done.stderr
        assert "Warning" not in done.stderr, done.stderr


# ------------------------------------------------------------------------------ the demo
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_demo_progress_ticks_on_a_terminal_and_prints_stage_lines_otherwise():
    import time

    from atso_fast.train.cli import DEMO_SETTINGS, _DemoProgress

    settings = DEMO_SETTINGS["quick"]
    plain = io.StringIO()
    progress = _DemoProgress(settings, ("supervised", "atso"), stream=plain)
    progress(None, {"round": 0, "val_mean_dice": 0.5, "seconds": 1.0})
    progress.close()
    lines = plain.getvalue().splitlines()
    assert "training 5 stages" in lines[0] and "warm-up" in lines[1] and "val mean Dice 0.500" in lines[1]
    terminal = _Terminal()
    progress = _DemoProgress(settings, ("supervised", "atso"), stream=terminal)
    time.sleep(1.3)  # the clock of the bar ticks while a stage trains
    ticked = terminal.getvalue().count("\r")
    progress(None, {"round": 0, "val_mean_dice": 0.5, "seconds": 1.0})
    progress.close()
    assert ticked >= 2 and "training: supervised round 1" in terminal.getvalue()


def test_the_demo_explains_every_column_it_prints():
    from atso_fast.train.cli import METHODS_LEGEND, ROUNDS_LEGEND, format_history

    history = [
        {
            "round": 0,
            "trained_on": ["L"],
            "train_labels_from": {},
            "relabelled": ["U1"],
            "relabelled_by": "M0",
            "train": {"loss": 1.0},
            "monitor": {},
            "val_mean_dice": 0.5,
        }
    ]
    header = format_history(history).splitlines()[0]
    for column in (
        "round",
        "trained on",
        "labels by",
        "relabelled",
        "loss",
        "pre-loss",
        "changed",
        "confidence",
        "val Dice",
    ):
        assert column in header and f"  {column}" in ROUNDS_LEGEND, column
    for column in ("val mean Dice", "train s", "relabel engine", "Mvox/s"):
        assert column in METHODS_LEGEND, column
