"""Tests of atso_fast.ray_engine: the archive relabelled on a local Ray instance.

One Ray instance (2 CPUs, small object store) serves the whole module. Every run is compared
with the local engine on the same archive: label files byte for byte, manifest rows equal.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from atso_fast import export_model
from atso_fast.archive import relabel_archive
from atso_fast.cli.relabel import main as cli_main
from atso_fast.engine.relabeler import Relabeler
from atso_fast.io import Manifest
from atso_fast.package import PackageError
from atso_fast.ray_engine import RayRunError, relabel_archive_ray

ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "atso-fast[ray]")')
pytest.importorskip("ray.data", reason='Ray Data is not installed (pip install "atso-fast[ray]")')

# Older Ray (2.30) leaves its log files open at ray.init; not ours to fix, not an error here.
pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

CRASH_SHAPE = (5, 10, 11)  # (Z, Y, X) of the one case the crashing relabelers die on


class CrashingRelabeler:
    """A real Relabeler that kills its process (``os._exit``) on volumes of ``crash_shape``:
    once when ``marker`` is given (the marker file records that it happened), else always."""

    takes_geometry = True  # passes the scan's spacing/affine on, like the Relabeler it wraps

    def __init__(self, model_dir, *, crash_shape, marker=None, **kwargs):
        self.inner = Relabeler(model_dir, **kwargs)
        self.crash_shape, self.marker = tuple(crash_shape), marker

    def relabel_volume(self, array, **geometry):
        if tuple(array.shape[-3:]) == self.crash_shape:
            if self.marker is None:
                os._exit(1)
            if not os.path.exists(self.marker):
                Path(self.marker).touch()
                os._exit(1)
        return self.inner.relabel_volume(array, **geometry)


def broken_factory(model_dir, **kwargs):
    raise RuntimeError("this model cannot be loaded on the workers")


# -------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ray_cluster():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ship the test factories
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny exported package: one 3x3x3 conv, 3 classes, window (4, 8, 8)."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, kernel_size=3, padding=1)
    with torch.no_grad():
        net.weight.mul_(0.05)
    return export_model(
        net.eval(),
        tmp_path_factory.mktemp("model"),
        window=(4, 8, 8),
        num_classes=3,
        normalization={"scheme": "zscore"},
    )


def _nifti(path: Path, seed: int, shape_xyz: tuple[int, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).integers(-300, 300, size=shape_xyz).astype(np.int16)
    affine = np.array([[0, 0, -2.0, 30], [0, 1.5, 0, -4], [0.7, 0, 0, 8], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), path)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """NIfTI (3D, 2D, in a sub-folder), npy, npz, one corrupt file, one CRASH_SHAPE case."""
    root = tmp_path_factory.mktemp("archive")
    for i, shape in enumerate([(9, 10, 7), (12, 8, 6), (5, 16, 9)]):
        _nifti(root / f"case{i}.nii.gz", i, shape)
    _nifti(root / "flat.nii.gz", 7, (13, 11))
    _nifti(root / "sub" / "deep_0000.nii.gz", 8, (8, 8, 8))
    rng = np.random.default_rng(3)
    np.save(root / "vol.npy", rng.normal(size=(6, 9, 10)).astype(np.float32))
    np.savez(root / "packed.npz", image=rng.integers(0, 99, size=(4, 7, 9)).astype(np.uint8))
    np.save(root / "crash.npy", rng.normal(size=CRASH_SHAPE).astype(np.float32))
    (root / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 3)
    return root


@pytest.fixture(scope="module")
def reference(model, archive, tmp_path_factory) -> tuple[Path, dict]:
    """The local engine's outputs and summary for the archive."""
    out = tmp_path_factory.mktemp("local")
    summary = relabel_archive(Relabeler(model), archive, out, recursive=True, save_confidence=True, progress=False)
    assert (summary["done"], summary["failed"]) == (8, 1)
    return out, summary


def output_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.jsonl"
    }


def manifest_rows(folder: Path) -> dict[str, dict]:
    """Latest row per case without the timing fields and the run fingerprint (unknown to the
    driver with a custom relabeler factory; compared where it is known)."""
    return {
        cid: {k: v for k, v in row.items() if k not in ("seconds", "timings", "run")}
        for cid, row in Manifest(folder / "manifest.jsonl").latest().items()
    }


def assert_same_as_local(out: Path, reference: tuple[Path, dict]) -> None:
    local, _ = reference
    ours, theirs = output_files(out), output_files(local)
    assert sorted(ours) == sorted(theirs)  # 8 cases x (labels + confidence), no temp files
    assert [name for name in theirs if ours[name] != theirs[name]] == []
    assert manifest_rows(out) == manifest_rows(local)


# ------------------------------------------------------------------------------- the engine
def test_outputs_and_manifest_equal_the_local_engine(ray_cluster, model, archive, reference, tmp_path):
    out = tmp_path / "out"
    summary = relabel_archive_ray(model, archive, out, workers=2, recursive=True, save_confidence=True, progress=False)
    local_summary = reference[1]
    for key in ("total", "done", "skipped", "failed", "failures"):
        assert summary[key] == local_summary[key], key
    assert "gzip" in dict(summary["failures"])["corrupt"]
    assert 0 < summary["busy_fraction"] <= 1 and summary["cases_per_s"] > 0
    assert_same_as_local(out, reference)
    rows = Manifest(out / "manifest.jsonl").rows()
    assert len(rows) == 9 and len({r["case_id"] for r in rows}) == 9  # one row per case
    local_runs = {r.get("run") for r in Manifest(reference[0] / "manifest.jsonl").rows() if r["status"] == "ok"}
    assert {r.get("run") for r in rows if r["status"] == "ok"} == local_runs and None not in local_runs


def test_a_killed_worker_is_retried_and_no_case_is_lost(ray_cluster, model, archive, reference, tmp_path):
    marker = tmp_path / "crashed-once"
    out = tmp_path / "out"
    summary = relabel_archive_ray(
        {"model_dir": model},
        archive,
        out,
        workers=2,
        recursive=True,
        save_confidence=True,
        progress=False,
        relabeler_factory=CrashingRelabeler,
        crash_shape=CRASH_SHAPE,
        marker=str(marker),
    )
    assert marker.exists()  # the worker did die on the crash case
    assert (summary["done"], summary["failed"]) == (8, 1)
    assert_same_as_local(out, reference)


def test_a_case_that_always_kills_its_worker_fails_alone(ray_cluster, model, archive, reference, tmp_path):
    out = tmp_path / "out"
    summary = relabel_archive_ray(
        model,
        archive,
        out,
        workers=2,
        recursive=True,
        progress=False,
        max_attempts=2,
        relabeler_factory=CrashingRelabeler,
        crash_shape=CRASH_SHAPE,
    )
    failures = dict(summary["failures"])
    assert (summary["done"], summary["failed"]) == (7, 2) and sorted(failures) == ["corrupt", "crash"]
    assert "died 2 times" in failures["crash"] and "crash.npy" in failures["crash"]
    local = output_files(reference[0])
    ours = output_files(out)
    assert sorted(ours) == sorted(k for k in local if "crash" not in k and "_confidence" not in k)
    assert all(ours[name] == local[name] for name in ours)


def test_resume_skips_finished_cases(ray_cluster, model, archive, reference, tmp_path):
    out = tmp_path / "out"
    first = relabel_archive_ray(
        model, archive, out, workers=2, recursive=True, num_parts=2, part_id=0, save_confidence=True, progress=False
    )
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.*") if p.name != "manifest.jsonl"}
    finished = [cid for cid, row in manifest_rows(out).items() if row["status"] == "ok"]
    summary = relabel_archive_ray(
        model, archive, out, workers=2, recursive=True, resume=True, save_confidence=True, progress=False
    )
    assert summary["skipped"] == len(finished) == first["done"] > 0
    assert summary["done"] + summary["skipped"] == 8 and summary["failed"] == 1
    rows = Manifest(out / "manifest.jsonl").rows()
    assert len(rows) == first["done"] + first["failed"] + summary["done"] + summary["failed"]
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # finished outputs untouched
    assert_same_as_local(out, reference)


def test_cli_engine_ray(ray_cluster, model, archive, reference, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        str(model),
        str(archive),
        str(out),
        "--engine",
        "ray",
        "--workers",
        "2",
        "--cpus-per-worker",
        "1",
        "--recursive",
        "--save-confidence",
        "--json",
    ]
    assert cli_main(argv) == 1  # the corrupt case failed
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert (summary["done"], summary["failed"]) == (8, 1) and "corrupt.nii.gz" in captured.err
    assert_same_as_local(out, reference)
    assert cli_main(argv[:-1] + ["--resume", "--quiet"]) == 1  # only the corrupt case is redone
    assert capsys.readouterr().out == ""


def test_a_run_that_cannot_start_workers_stops_with_one_clear_error(ray_cluster, model, archive, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RayRunError, match="cannot be loaded on the workers") as info:
        relabel_archive_ray(model, archive, out, recursive=True, progress=False, relabeler_factory=broken_factory)
    assert "rerun with --resume" in str(info.value) and "\n" not in str(info.value)
    assert Manifest(out / "manifest.jsonl").completed() == {}


# ------------------------------------------------------------------- checks before any Ray
@pytest.mark.parametrize(
    "options,error,word",
    [
        ({"workers": 0}, ValueError, "workers must be an int >= 1, got 0"),
        ({"workers": 1.5}, ValueError, "workers"),
        ({"cpus_per_worker": 0}, ValueError, "cpus_per_worker must be a number > 0, got 0"),
        ({"gpus_per_worker": -1}, ValueError, "gpus_per_worker"),
        ({"gpus_per_worker": 1}, ValueError, "device 'cpu'"),
        ({"device": "cuda"}, ValueError, "gpus_per_worker > 0"),
        ({"device": "cuda:1", "gpus_per_worker": 1}, ValueError, "use device='cuda'"),
        ({"max_attempts": 0}, ValueError, "max_attempts"),
        ({"overlapp": 0.5}, TypeError, "overlapp"),
    ],
)
def test_options_are_checked_before_ray_starts(model, tmp_path, options, error, word):
    with pytest.raises(error, match=word.replace("(", r"\(")):
        relabel_archive_ray(model, tmp_path, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_bad_model_arguments_are_named(tmp_path):
    with pytest.raises(PackageError, match="model.json"):
        relabel_archive_ray(tmp_path / "nothing", tmp_path, tmp_path / "out")
    with pytest.raises(TypeError, match="model_dir"):
        relabel_archive_ray({"device": "cpu"}, tmp_path, tmp_path / "out")
    with pytest.raises(TypeError, match="Relabeler"):
        relabel_archive_ray(object(), tmp_path, tmp_path / "out")


def test_cli_ray_usage_errors(model, tmp_path, capsys, monkeypatch):
    (tmp_path / "in").mkdir()  # the input is checked first, so it must be a usable one
    np.save(tmp_path / "in" / "a.npy", np.zeros((4, 8, 8), np.float32))
    base = [str(model), str(tmp_path / "in"), str(tmp_path / "out")]
    assert cli_main(base + ["--workers", "2"]) == 2
    assert "only apply to --engine ray" in capsys.readouterr().err
    assert cli_main(base + ["--engine", "ray", "--workers", "0"]) == 2
    assert "workers must be an int >= 1, got 0" in capsys.readouterr().err
    assert cli_main([str(tmp_path), str(tmp_path / "in"), str(tmp_path / "o"), "--engine", "ray"]) == 2
    assert "model.json" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    assert cli_main(base + ["--engine", "ray"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "atso-fast[ray]"' in err and len(err.strip().splitlines()) == 1


def test_a_worker_no_node_can_host_is_refused_not_waited_for(ray_cluster, model, archive, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"each needs 4 CPU and 0 GPU, the largest node has 2 CPU"):
        relabel_archive_ray(model, archive, out, workers=1, cpus_per_worker=4, recursive=True, progress=False)
    assert (
        cli_main(
            [str(model), str(archive), str(tmp_path / "o2"), "--engine", "ray", "--cpus-per-worker", "4", "--recursive"]
        )
        == 2
    )
    assert "lower --cpus-per-worker" in capsys.readouterr().err
