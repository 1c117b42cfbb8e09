"""``auto`` by measured agreement (issue 25): the record, and the choice it drives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from atso_fast import export_model
from atso_fast.cli import main
from atso_fast.engine import Relabeler
from atso_fast.engine.agreement import (
    RECORD_KEY,
    agreement_table,
    choose_runtime,
    default_count,
    machine_id,
    measure_package,
    runtime_revision,
    sample_windows,
)
from atso_fast.package import load_package
from atso_fast.package.normalize import normalize
from atso_fast.runtimes.openvino_rt import openvino_available

needs_openvino = pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(8, 3, 1)).eval()


@pytest.fixture
def package_dir(tmp_path):
    return export_model(
        _net(),
        tmp_path / "pkg",
        window=(8, 8, 8),
        num_classes=3,
        normalization={"scheme": "zscore", "mean": 0.0, "std": 1.0},
    )


def _rewrite(package_dir, record):
    meta = json.loads((package_dir / "model.json").read_text())
    meta[RECORD_KEY] = record
    (package_dir / "model.json").write_text(json.dumps(meta))


def _record(package_dir, results, machine=None, device="cpu"):
    """A record of ``results``, each stamped with its runtime's current graph form."""
    meta = json.loads((package_dir / "model.json").read_text())
    results = {
        k: {**v, "revision": runtime_revision(k.split("/")[0])} if runtime_revision(k.split("/")[0]) else v
        for k, v in results.items()
    }
    return {
        "version": 1,
        "onnx_sha256": meta["onnx_sha256"],
        "device": device,
        "machine": machine or machine_id(),
        "measured": "test",
        "reference": "torch/float32",
        "windows": 4,
        "input": "test",
        "tolerance": 0.999,
        "results": results,
    }


def test_measure_records_every_runtime_against_the_reference(package_dir):
    volume = np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)
    record = measure_package(package_dir, volume, count=4)
    meta = json.loads((package_dir / "model.json").read_text())
    assert meta[RECORD_KEY] == record and meta["onnx_sha256"] == record["onnx_sha256"]
    assert record["reference"] == "torch/float32" and record["windows"] == 4 and "scan" in record["input"]
    ort = record["results"]["onnxruntime/float32"]
    assert ort["status"] == "ok" and ort["label_agreement"] > 0.99 and ort["max_abs_logit_error"] < 1e-3
    assert ort["windows_per_s"] > 0
    assert record["results"]["torch/float32"]["label_agreement"] == 1.0  # the reference itself
    load_package(package_dir)  # the package still loads: the record is only a new field
    table = agreement_table(record)
    assert "onnxruntime/float32" in table and "labels agree" in table


def test_sample_windows_from_a_scan_are_the_engines_windows(package_dir):
    package = load_package(package_dir)
    volume = np.arange(16 * 16 * 16, dtype=np.float32).reshape(16, 16, 16)
    windows, source = sample_windows(package, volume, count=3)
    assert windows.shape == (3, 1, 8, 8, 8) and "3 windows" in source
    z = normalize(volume, package.normalization)  # the package's own normalisation
    np.testing.assert_allclose(windows[0, 0], z[:8, :8, :8], rtol=1e-6)  # the grid's first window
    np.testing.assert_allclose(windows[-1, 0], z[8:, 8:, 8:], rtol=1e-6)  # ... and its last


def test_auto_takes_the_fastest_runtime_that_meets_the_tolerance(package_dir):
    fast_but_wrong = {"status": "ok", "label_agreement": 0.98, "max_abs_logit_error": 0.5, "windows_per_s": 900.0}
    good = {"status": "ok", "label_agreement": 0.9995, "max_abs_logit_error": 1e-4, "windows_per_s": 300.0}
    slower = {"status": "ok", "label_agreement": 1.0, "max_abs_logit_error": 0.0, "windows_per_s": 100.0}
    _rewrite(
        package_dir,
        _record(
            package_dir, {"openvino/float32": fast_but_wrong, "onnxruntime/float32": good, "torch/float32": slower}
        ),
    )
    rel = Relabeler(package_dir)
    assert rel.runtime_name == "onnxruntime" and "fastest" in rel.runtime_reason and "99.95" in rel.runtime_reason
    # the same record with openvino agreeing: it is the fastest that meets the tolerance
    if openvino_available():
        _rewrite(
            package_dir,
            _record(
                package_dir,
                {"openvino/float32": {**fast_but_wrong, "label_agreement": 0.9999}, "onnxruntime/float32": good},
            ),
        )
        assert Relabeler(package_dir).runtime_name == "openvino"


def test_a_record_of_another_network_machine_or_device_does_not_steer(package_dir):
    good = {"status": "ok", "label_agreement": 1.0, "max_abs_logit_error": 0.0, "windows_per_s": 1e6}
    record = _record(package_dir, {"torch/float32": good})
    _rewrite(package_dir, {**record, "onnx_sha256": "0" * 64})  # another network's record
    rel = Relabeler(package_dir)
    assert "the rule" in rel.runtime_reason and rel.runtime_name != "torch"
    _rewrite(package_dir, {**record, "device": "cuda"})
    assert "the rule" in Relabeler(package_dir).runtime_reason
    _rewrite(package_dir, {**record, "results": "not a dict"})  # malformed: ignored, not trusted
    assert "the rule" in Relabeler(package_dir).runtime_reason
    # another machine: agreement still counts, speed does not (the rule's order among those agreeing)
    both = {"torch/float32": good, "onnxruntime/float32": {**good, "windows_per_s": 1.0}}
    _rewrite(package_dir, _record(package_dir, both, machine="another machine"))
    rel = Relabeler(package_dir)
    assert "another machine" in rel.runtime_reason and rel.runtime_name in ("openvino", "onnxruntime")


def test_a_result_of_an_older_graph_form_is_not_counted(package_dir):
    """OpenVINO runs a rewritten graph (its norms): agreement measured on another form of it
    (an older atso-fast) says nothing about the graph it runs now."""
    good = {"status": "ok", "label_agreement": 1.0, "max_abs_logit_error": 0.0, "windows_per_s": 1e6}
    slower = {**good, "windows_per_s": 1.0}
    record = _record(package_dir, {"openvino/float32": good, "onnxruntime/float32": slower})
    record["results"]["openvino/float32"]["revision"] = "norms-an-older-form"
    _rewrite(package_dir, record)
    package = load_package(package_dir)
    candidates, reason = choose_runtime(package, device="cpu", precision="float32", has_module=False, has_program=True)
    assert candidates[0] == "onnxruntime" and "not counted: openvino" in reason and "atso-fast measure" in reason
    del record["results"]["openvino/float32"]["revision"]  # a record from before revisions: the same
    _rewrite(package_dir, record)
    candidates, reason = choose_runtime(
        load_package(package_dir), device="cpu", precision="float32", has_module=False, has_program=True
    )
    assert candidates[0] == "onnxruntime" and "not counted: openvino" in reason


def test_machine_id_names_the_speed_relevant_cpu_features():
    ident = machine_id()
    assert "cores" in ident
    flags = (
        Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0]
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    if " avx512f" in flags:
        assert "avx512f" in ident


def test_no_runtime_meets_the_tolerance_falls_back_to_the_rule(package_dir):
    bad = {"status": "ok", "label_agreement": 0.5, "max_abs_logit_error": 3.0, "windows_per_s": 10.0}
    _rewrite(package_dir, _record(package_dir, {"onnxruntime/float32": bad, "torch/float32": bad}))
    package = load_package(package_dir)
    candidates, reason = choose_runtime(package, device="cpu", precision="float32", has_module=False, has_program=True)
    assert "no runtime met" in reason and candidates


def test_measure_command_and_verbose_relabel(package_dir, tmp_path, capsys):
    scan = tmp_path / "scan.npy"
    np.save(scan, np.random.default_rng(1).normal(size=(12, 12, 12)).astype(np.float32))
    assert main(["measure", str(package_dir), "--scan", str(scan), "--windows", "2"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime/float32" in out and "auto would run" in out
    assert RECORD_KEY in json.loads((package_dir / "model.json").read_text())
    assert main(["measure", str(tmp_path / "missing")]) == 2


def test_relabel_says_its_runtime_and_verbose_shows_the_table(package_dir, tmp_path, capsys):
    measure_package(package_dir, count=2)
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "a.npy", np.random.default_rng(2).normal(size=(10, 10, 10)).astype(np.float32))
    assert main(["relabel", str(package_dir), str(tmp_path / "in"), str(tmp_path / "out"), "-v"]) == 0
    err = capsys.readouterr().err
    assert "atso-fast relabel: runtime " in err and "meeting 99.90% label agreement" in err
    assert "labels agree" in err  # the table


def test_measure_command_records_each_precision_asked_for(package_dir, capsys):
    assert main(["measure", str(package_dir), "--windows", "2", "--precisions", "float32,bfloat16", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    precisions = {key.split("/")[1] for key in record["results"]}
    assert precisions == {"float32", "bfloat16"}
    # a runtime that cannot run a precision here is recorded as such, not dropped
    assert all(v["status"] in ("ok", "unavailable", "failed") for v in record["results"].values())
    assert main(["measure", str(package_dir), "--precisions", "float64"]) == 2
    assert "unknown precision 'float64'" in capsys.readouterr().err


def test_export_measures_unless_told_not_to(tmp_path, capsys):
    torch.save(torch.nn.Conv3d(1, 3, 1).state_dict(), tmp_path / "conv.pt")
    kwargs = '{"in_channels": 1, "out_channels": 3, "kernel_size": 1}'
    argv = [
        "export",
        str(tmp_path / "conv.pt"),
        str(tmp_path / "pkg"),
        "--window",
        "8",
        "8",
        "8",
        "--classes",
        "3",
        "--network",
        "torch.nn:Conv3d",
        "--network-kwargs",
        kwargs,
    ]
    assert main(argv) == 0
    assert "measuring the runtimes" in capsys.readouterr().err
    assert RECORD_KEY in json.loads((tmp_path / "pkg" / "model.json").read_text())
    assert main([*argv[:2], str(tmp_path / "pkg2"), *argv[3:], "--no-measure"]) == 0
    assert RECORD_KEY not in json.loads((tmp_path / "pkg2" / "model.json").read_text())


def test_the_default_window_count_holds_a_few_million_voxels(package_dir):
    """3 windows of nnU-Net's planner window (64 x 160 x 192, ~2 M voxels), 8 of small ones."""
    package = load_package(package_dir)
    assert default_count(package) == 8  # a small test window
    package.window = (64, 160, 192)
    assert default_count(package) == 3
    package.window = (48, 96, 96)
    assert default_count(package) == 8
    package.window = (128, 128, 128)
    assert default_count(package) == 2
    package.window = (512, 1024)
    assert default_count(package) == 8


def test_measure_records_the_faster_torch_layout(package_dir):
    volume = np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)
    record = measure_package(package_dir, volume, count=4)
    torch_result = record["results"]["torch/float32"]
    assert torch_result["layout"] in ("contiguous", "channels_last") and torch_result["windows_per_s"] > 0


@pytest.mark.parametrize("layout,expected", [("channels_last", True), ("contiguous", False)])
def test_the_torch_runtime_takes_the_recorded_layout_and_skips_the_probe(package_dir, layout, expected):
    entry = {"status": "ok", "label_agreement": 1.0, "max_abs_logit_error": 0.0, "windows_per_s": 1.0}
    _rewrite(package_dir, _record(package_dir, {"torch/float32": {**entry, "layout": layout}}))
    relabeler = Relabeler(package_dir, runtime="torch", batch_size=2)
    assert relabeler.runtime.channels_last is expected
    relabeler.relabel_volume(np.random.default_rng(1).normal(size=(16, 16, 16)).astype(np.float32))
    assert relabeler.runtime.layout_probe is None  # no batch ran in the other layout


def test_a_layout_measured_on_another_machine_is_not_taken(package_dir):
    entry = {"status": "ok", "label_agreement": 1.0, "max_abs_logit_error": 0.0, "windows_per_s": 1.0}
    _rewrite(package_dir, _record(package_dir, {"torch/float32": {**entry, "layout": "contiguous"}}, machine="other"))
    assert Relabeler(package_dir, runtime="torch", batch_size=2).runtime.channels_last is None  # it probes
