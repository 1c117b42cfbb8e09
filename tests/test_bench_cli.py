"""``atso-fast bench``: runs on a tiny volume, prints the table or valid JSON, checks correctness."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from atso_fast import cli, load_package
from atso_fast.bench import memory, networks, runner
from atso_fast.cli import bench as bench_cli
from atso_fast.datasets import synthetic
from atso_fast.runtimes import tensorrt_available

TINY = ["--shape", "32", "32", "40", "--repeats", "1", "--batch", "2"]


@pytest.fixture(scope="module")
def convnet_package(tmp_path_factory):
    path, name = networks.export_builtin(
        tmp_path_factory.mktemp("pkg") / "model", window=(16, 16, 16), classes=2, net="convnet"
    )
    assert name == "convnet"
    return path


def test_builtin_unet_json(capsys):
    pytest.importorskip("monai")
    rc = cli.main(["bench", *TINY, "--window", "32", "32", "32", "--runtimes", "all", "--json"])
    out = capsys.readouterr().out
    report = json.loads(out)
    assert rc == 0 and report["correct"] is True
    assert report["model"]["source"] == "builtin:monai-unet" and report["model"]["windows"] == 2
    rows = {r["runtime"]: r for r in report["results"]}
    for name in ("onnxruntime", "torch"):
        row = rows[name]
        assert row["status"] == "ok" and row["correct"] is True and row["agreement"] >= 0.9999
        assert row["seconds"] > 0 and row["network_seconds"] > 0 and row["peak_host_mib"] > 0
        assert row["windows_per_s"] == pytest.approx(2 / row["seconds"])
    if not tensorrt_available():
        assert rows["tensorrt"]["status"] == "skipped" and "TensorRT" in rows["tensorrt"]["reason"]


def test_table_with_model_dir_lists_skipped_pairs(convnet_package, capsys):
    rc = cli.main(
        ["bench", str(convnet_package), *TINY, "--runtimes", "onnxruntime,torch", "--precision", "float32,float16"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["runtime", "precision"])
    assert "overhead" in header and "agreement" in header and "GPU MiB" not in header
    ran = [line.split() for line in lines if line.split()[:2] in (["onnxruntime", "float32"], ["torch", "float32"])]
    assert len(ran) == 2 and all(r[-1] == "True" for r in ran)
    assert any(line.startswith("skipped: onnxruntime/float16:") for line in lines)
    assert any(line.startswith("skipped: torch/float16:") and "cuda" in line for line in lines)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--overlap", "1.5"], "1.5"),
        (["--runtimes", "onnx"], "'onnx'"),
        (["--precision", "float8"], "'float8'"),
        (["--shape", "0", "8", "8"], "--shape must be positive, got 0 8 8"),
        (["--repeats", "0"], "--repeats must be positive, got 0"),
        (["--device", "tpu"], "'tpu'"),
    ],
)
def test_bad_options_name_the_value(argv, needle, capsys):
    assert bench_cli.cli_main(argv) == 2
    assert needle in capsys.readouterr().err


def test_model_dir_rejects_builtin_options(convnet_package, capsys):
    assert bench_cli.cli_main([str(convnet_package), "--classes", "4"]) == 2
    assert "built-in" in capsys.readouterr().err


def test_missing_package_is_a_usage_error(tmp_path, capsys):
    assert bench_cli.cli_main([str(tmp_path / "nope")]) == 2
    assert "model.json" in capsys.readouterr().err


def test_unet_window_must_survive_four_halvings():
    with pytest.raises(ValueError, match=r"multiples of 16 and >= 32, got \(16, 16, 16\)"):
        networks.check_builtin_window((16, 16, 16), "monai-unet")
    networks.check_builtin_window((16, 16, 16), "convnet")


def test_synthetic_ct_is_seeded_int16_hu():
    a, b = synthetic.synthetic_ct((12, 20, 18), seed=3), synthetic.synthetic_ct((12, 20, 18), seed=3)
    assert a.dtype == np.int16 and a.shape == (12, 20, 18)
    np.testing.assert_array_equal(a, b)
    assert a.min() < -900 and a.max() > 500  # air and bone are both there
    with pytest.raises(ValueError, match=r"got \(0, 4, 4\)"):
        synthetic.synthetic_ct((0, 4, 4))


def test_window_batches_follow_the_engine(convnet_package):
    package = load_package(convnet_package)
    volume = synthetic.synthetic_ct((20, 40, 24))
    batches = runner.window_batches(package, volume, 0.5, 3, "cpu")
    from atso_fast import Relabeler

    rel = Relabeler(convnet_package, runtime="onnxruntime", batch_size=3)
    assert sum(b.shape[0] for b in batches) == rel.relabel_volume(volume).stats["windows"]
    assert all(b.shape[1:] == (1, 16, 16, 16) and b.dtype == np.float32 for b in batches)
    assert max(b.shape[0] for b in batches) == 3


def test_network_alone_runs_the_split_of_each_runtime(convnet_package, monkeypatch):
    """A dynamic-batch runtime (OpenVINO) relabels in near-equal batches: its network-alone time
    must run that split too, or the overhead column mixes in the split difference."""
    pytest.importorskip("openvino")
    seen = {}

    def fake_time_pair(rel, cfg, volume, batches):
        seen[rel.runtime.name] = [int(b.shape[0]) for b in batches]
        return {}

    monkeypatch.setattr(runner, "_time_pair", fake_time_pair)
    args = bench_cli.build_parser().parse_args(
        [
            str(convnet_package),
            "--shape",
            "16",
            "16",
            "56",
            "--repeats",
            "1",
            "--batch",
            "4",
            "--runtimes",
            "onnxruntime,openvino",
        ]
    )
    cfg = bench_cli.config_from_args(args)
    report = runner.run_bench(cfg)
    assert report["model"]["windows"] == 6
    assert seen == {"onnxruntime": [4, 2], "openvino": [3, 3]}


def test_peak_memory_sees_native_allocations():
    with memory.PeakMemory(interval_s=0.002) as mem:
        # 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB), so these are fresh
        # pages whatever earlier tests freed, and resident memory must grow
        block = np.ones(64 * 2**20, np.uint8)
        time.sleep(0.05)
        del block
    assert mem.delta_mib >= 48 and mem.peak_mib >= mem.start_mib


def _load_script(name: str):
    """A module from benchmarks/ (a folder of scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_archive_smoke(tmp_path, capsys):
    pytest.importorskip("monai")
    archive = _load_script("bench_archive")
    out = tmp_path / "report.json"
    rc = archive.main(
        [
            "--cases",
            "2",
            "--shape",
            "20",
            "24",
            "28",
            "--window",
            "16",
            "16",
            "16",
            "--net",
            "convnet",
            "--workdir",
            str(tmp_path / "work"),
            "--output",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert rc == 0 and report["correct"] and report["agreement_min"] >= 0.9999
    assert report["atso_fast"]["summary"]["done"] == 2 and report["speedup"] > 0
    assert "speed-up (a)/(b)" in capsys.readouterr().out


def test_scaling_point_in_process(tmp_path):
    pytest.importorskip("monai")
    scaling = _load_script("scaling")
    assert scaling.parse_shape("8x9,10") == (8, 9, 10)
    with pytest.raises(ValueError, match="got '8,9'"):
        scaling.parse_shape("8,9")
    spec = {
        "method": "atso_fast",
        "shape": [20, 24, 28],
        "classes": 4,
        "window": [16, 16, 16],
        "overlap": 0.5,
        "batch": 2,
        "device": "cpu",
        "runtime": "torch",
        "accumulate_dtype": "float16",
        "model_dir": None,
        "net": "convnet",
        "seed": 0,
        "repeats": 1,
        "labels_path": str(tmp_path / "a.npy"),
    }
    row = scaling.measure_point(spec)
    scaling.measure_point({**spec, "method": "monai", "labels_path": str(tmp_path / "b.npy")})
    assert row["cold_seconds"] > 0 and row["peak_host_mib"] >= 0 and row["device_peak_mib"] is None
    assert (np.load(tmp_path / "a.npy") == np.load(tmp_path / "b.npy")).mean() >= 0.999
    times = scaling.time_point({**spec, "method": "timing"})
    assert sorted(times) == ["atso_fast", "monai"] and all(len(t) == 1 and t[0] > 0 for t in times.values())


def test_reset_peak_rss_forgets_an_earlier_peak():
    block = np.ones(64 * 2**20, np.uint8)  # 64 MiB peak, then freed
    del block
    if not memory.reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here")
    with memory.PeakMemory() as now:  # start_mib: the current RSS
        pass
    assert memory.maxrss_mib() < now.start_mib + 32  # the freed 64 MiB no longer counts
