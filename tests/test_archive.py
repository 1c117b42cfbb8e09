"""Tests of atso_fast.archive: bulk relabelling, resume, part split, failures, kill -9, CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from atso_fast.archive import relabel_archive
from atso_fast.cli import relabel as relabel_cli
from atso_fast.cli.relabel import main as cli_main
from atso_fast.engine import Relabeler
from atso_fast.io import InputError, Manifest, has_nonfinite, read_volume
from atso_fast.package import export_model

REPO = Path(__file__).resolve().parents[1]
from conftest import REAL_DATA as REAL  # noqa: E402
from conftest import REAL_DATA_MISSING  # noqa: E402

REAL_IMAGES = sorted(REAL.glob("*/image.nii.gz")) if REAL.is_dir() else []


class FakeRelabeler:
    """Known-answer relabeler: 0 below zero, 1 in [0, 100], 2 above; confidence = |x| clipped.

    Rejects NaN/inf voxels and more than one channel, like a strict engine would.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls = 0

    def relabel_volume(self, array: np.ndarray) -> types.SimpleNamespace:
        self.calls += 1
        if array.ndim == 4:
            if array.shape[0] != 1:
                raise ValueError(f"expected 1 input channel, got {array.shape[0]}")
            array = array[0]
        if has_nonfinite(array):
            raise ValueError("volume has non-finite voxels")
        if self.delay:
            time.sleep(self.delay)
        return fake_result(array)


def fake_result(array: np.ndarray) -> types.SimpleNamespace:
    labels = (array >= 0).astype(np.uint8) + (array > 100)
    confidence = np.clip(np.abs(array), 0, 255).astype(np.uint8)
    counts = np.bincount(labels.ravel(), minlength=3).tolist()
    stats = {"label_counts": counts, "ignored_fraction": 0.0, "mean_confidence": float(confidence.mean()) / 255}
    return types.SimpleNamespace(labels=labels, confidence=confidence, stats=stats)


def make_case(path: Path, seed: int, shape_xyz=(9, 8, 7)) -> Path:
    """A small int16 NIfTI (gzipped per the name) with a non-trivial affine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).integers(-300, 300, size=shape_xyz).astype(np.int16)
    affine = np.array([[0, 0, -2.0, 30], [0, 1.5, 0, -4], [0.7, 0, 0, 8], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, affine)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    nib.save(img, path)
    return path


def make_archive(root: Path, n: int = 6) -> list[Path]:
    paths = [make_case(root / f"case{i:02d}.nii.gz", i) for i in range(n - 2)]
    paths.append(make_case(root / "sub" / "deep_0000.nii.gz", 100))
    np.save(root / "vol.npy", np.random.default_rng(5).normal(size=(4, 6, 5)).astype(np.float32))
    return paths + [root / "vol.npy"]


def output_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.jsonl"
    }


def statuses(out: Path) -> dict[str, str]:
    return {cid: row["status"] for cid, row in Manifest(out / "manifest.jsonl").latest().items()}


# ------------------------------------------------------------------------------ basic run
def test_relabel_archive_writes_labels_on_the_input_grid(tmp_path):
    make_archive(tmp_path / "in")
    out = tmp_path / "out"
    summary = relabel_archive(
        FakeRelabeler(), tmp_path / "in", out, recursive=True, save_confidence=True, progress=False
    )
    assert (summary["total"], summary["done"], summary["skipped"], summary["failed"]) == (6, 6, 0, 0)
    assert 0 < summary["busy_fraction"] <= 1 and summary["voxels_per_s"] > 0
    assert summary["failures"] == []
    assert statuses(out) == {k: "ok" for k in ["case00", "case01", "case02", "case03", "sub/deep", "vol"]}
    for src in [tmp_path / "in" / "case01.nii.gz", tmp_path / "in" / "sub/deep_0000.nii.gz"]:
        image, meta = read_volume(src)
        rel = src.relative_to(tmp_path / "in").as_posix().replace("_0000", "")
        written = nib.load(out / rel)
        assert written.get_data_dtype() == np.uint8 and written.shape == (9, 8, 7)
        np.testing.assert_allclose(written.affine, meta.affine)
        expected = fake_result(image)
        np.testing.assert_array_equal(np.asanyarray(written.dataobj), expected.labels.T)
        confidence = nib.load(out / rel.replace(".nii.gz", "_confidence.nii.gz"))
        np.testing.assert_array_equal(np.asanyarray(confidence.dataobj), expected.confidence.T)
    np.testing.assert_array_equal(np.load(out / "vol.npy"), fake_result(np.load(tmp_path / "in" / "vol.npy")).labels)
    row = Manifest(out / "manifest.jsonl").latest()["case01"]
    assert row["shape"] == [7, 8, 9] and sum(row["label_counts"]) == 7 * 8 * 9
    assert row["outputs"] == {"labels": "case01.nii.gz", "confidence": "case01_confidence.nii.gz"}


def test_progress_bar_and_option_validation(tmp_path, capsys):
    make_archive(tmp_path / "in", n=3)
    relabel_archive(
        FakeRelabeler(), tmp_path / "in", tmp_path / "out", progress=True, readers=1, writers=1, queue_size=1
    )
    assert "relabel" in capsys.readouterr().err
    for bad in [{"readers": 0}, {"writers": -1}, {"queue_size": 1.5}, {"num_parts": 0}, {"part_id": 3, "num_parts": 2}]:
        with pytest.raises(ValueError):
            relabel_archive(FakeRelabeler(), tmp_path / "in", tmp_path / "o2", **bad)
    with pytest.raises(TypeError, match="relabel_volume"):
        relabel_archive(object(), tmp_path / "in", tmp_path / "o2")


# ---------------------------------------------------------------------------------- resume
def test_resume_skips_finished_and_redoes_missing_outputs(tmp_path):
    make_archive(tmp_path / "in")
    out = tmp_path / "out"
    relabel_archive(FakeRelabeler(), tmp_path / "in", out, recursive=True, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    fake = FakeRelabeler()
    summary = relabel_archive(fake, tmp_path / "in", out, recursive=True, resume=True, progress=False)
    assert (summary["done"], summary["skipped"], fake.calls) == (0, 6, 0)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    (out / "case02.nii.gz").unlink()
    summary = relabel_archive(fake, tmp_path / "in", out, recursive=True, resume=True, progress=False)
    assert (summary["done"], summary["skipped"], fake.calls) == (1, 5, 1)
    summary = relabel_archive(
        fake, tmp_path / "in", out, recursive=True, resume=True, save_confidence=True, progress=False
    )  # needs the extra output
    assert (summary["done"], summary["skipped"]) == (6, 0)


def test_failed_cases_are_retried_on_resume(tmp_path):
    make_archive(tmp_path / "in", n=4)
    bad = np.zeros((3, 4, 5), np.float32)
    bad[0, 0, 0] = np.nan
    np.save(tmp_path / "in" / "vol.npy", bad)
    out = tmp_path / "out"
    summary = relabel_archive(FakeRelabeler(), tmp_path / "in", out, progress=False)
    assert summary["failed"] == 1 and statuses(out)["vol"] == "failed"
    np.save(tmp_path / "in" / "vol.npy", np.nan_to_num(bad))
    summary = relabel_archive(FakeRelabeler(), tmp_path / "in", out, resume=True, progress=False)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (1, 2, 0)
    assert statuses(out)["vol"] == "ok"


# ------------------------------------------------------------------------------ part split
def test_parts_cover_every_case_exactly_once(tmp_path):
    make_archive(tmp_path / "in", n=8)
    out = tmp_path / "out"
    done = []
    for part in range(3):
        summary = relabel_archive(
            FakeRelabeler(), tmp_path / "in", out, recursive=True, num_parts=3, part_id=part, progress=False
        )
        assert summary["failed"] == 0
        done.append(summary["done"])
    rows = Manifest(out / "manifest.jsonl").rows()
    ids = [r["case_id"] for r in rows]
    assert sum(done) == 8 and len(ids) == 8 and len(set(ids)) == 8
    assert all(r["status"] == "ok" for r in rows)
    reference = tmp_path / "ref"
    relabel_archive(FakeRelabeler(), tmp_path / "in", reference, recursive=True, progress=False)
    assert output_files(out) == output_files(reference)


# -------------------------------------------------------------------------------- failures
def _bad_cases(folder: Path) -> dict[str, str]:
    """Write bad inputs next to good ones; returns case id -> word expected in the error."""
    good = make_case(folder / "good_gz.nii.gz", 1).read_bytes()
    (folder / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    (folder / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 3)
    (folder / "notimage.nii").write_text("this is a text file, not a scan\n" * 30)
    np.save(folder / "one_d.npy", np.zeros(10))
    np.save(folder / "five_d.npy", np.zeros((1, 2, 3, 4, 5)))
    np.save(folder / "two_channels.npy", np.zeros((2, 3, 4, 5), np.float32))
    nan = np.ones((3, 4, 5), np.float32)
    nan[1, 1, 1] = np.nan
    np.save(folder / "nan.npy", nan)
    np.save(folder / "zero.npy", np.zeros((0, 4, 5)))
    make_case(folder / "locked.nii.gz", 2)
    return {
        "truncated": "gzip",
        "corrupt": "gzip",
        "notimage": "not a NIfTI",
        "one_d": "shape (10,)",
        "five_d": "shape (1, 2, 3, 4, 5)",
        "two_channels": "1 input channel",
        "nan": "non-finite",
        "zero": "zero-size",
        "locked": "permission denied",
        "adir": "directory",
    }


def test_every_bad_input_fails_alone(tmp_path, deny_open, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    expected = _bad_cases(folder)
    goods = [make_case(folder / f"ok{i}.nii.gz", 10 + i).name for i in range(3)] + ["good_gz.nii.gz"]
    (folder / "adir.nii.gz").mkdir()
    names = goods + [p.name for p in sorted(folder.iterdir()) if p.name not in goods]
    (folder / "cases.txt").write_text("\n".join(names) + "\n")
    deny_open("locked.nii.gz")
    out = tmp_path / "out"
    summary = relabel_archive(FakeRelabeler(), folder / "cases.txt", out, progress=False)
    assert summary["done"] == len(goods) and summary["failed"] == len(expected)
    rows = Manifest(out / "manifest.jsonl").latest()
    for cid, word in expected.items():
        assert rows[cid]["status"] == "failed", cid
        assert word.lower() in rows[cid]["error"].lower() and cid in rows[cid]["error"], rows[cid]
    assert all(rows[Path(n).name.split(".")[0]]["status"] == "ok" for n in goods)
    err_lines = [line for line in capsys.readouterr().err.splitlines() if "failed:" in line]
    assert len(err_lines) == len(expected)
    assert sorted(dict(summary["failures"])) == sorted(expected)


def test_cli_exits_nonzero_when_a_case_failed(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "in"
    make_archive(folder, n=4)  # case00, case01, vol.npy (sub/ needs --recursive)
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 broken")
    seen = {}

    class Relabeler(FakeRelabeler):
        def __init__(self, model_dir, **kwargs):
            super().__init__()
            seen.update(kwargs, model_dir=model_dir)

    monkeypatch.setattr(relabel_cli, "Relabeler", Relabeler)
    argv = [
        str(tmp_path / "model"),
        str(folder),
        str(tmp_path / "out"),
        "--json",
        "--overlap",
        "0.25",
        "--batch-size",
        "3",
        "--mirror",
        "--precision",
        "float16",
        "--threshold",
        "0.6",
    ]
    assert cli_main(argv) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert (summary["done"], summary["failed"]) == (3, 1) and "broken.nii.gz" in captured.err
    assert seen == {
        "model_dir": str(tmp_path / "model"),
        "runtime": "auto",
        "device": "cpu",
        "overlap": 0.25,
        "batch_size": 3,
        "threshold": 0.6,
        "ignore_index": 255,
        "mirror": True,
        "precision": "float16",
        "accumulate_dtype": "float32",
        "nonfinite": "fail",
        "threads": None,
        "compile": False,
        "save_probabilities": False,
    }
    (folder / "broken.nii.gz").unlink()
    assert cli_main(argv[:3] + ["--resume", "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_cli_broken_model_is_one_line_and_exit_2(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"definitely not protobuf")
    (model / "model.json").write_text(
        json.dumps({"format_version": 1, "window": [8, 8, 8], "num_classes": 3, "in_channels": 5})
    )
    make_archive(tmp_path / "in", n=3)
    assert cli_main([str(model), str(tmp_path / "in"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("atso-fast relabel: error:")


@pytest.mark.parametrize(
    "extra,word",
    [
        (["--workers", "2"], "only apply to --engine ray"),
        (["--num-parts", "2", "--part-id", "2"], "part_id"),
        (["--readers", "0"], "--readers"),
    ],
)
def test_cli_usage_errors_exit_2(tmp_path, capsys, extra, word):
    assert cli_main([str(tmp_path), str(tmp_path), str(tmp_path / "o"), *extra]) == 2
    assert word in capsys.readouterr().err
    assert cli_main(["--help"]) == 0
    assert cli_main(["only-one-arg"]) == 2


# --------------------------------------------------------------------------- output names
def test_outputs_stay_inside_and_inputs_are_never_overwritten(tmp_path):
    folder = tmp_path / "in"
    make_archive(folder, n=3)
    before = output_files(folder)
    with pytest.raises(InputError, match="inside the input folder"):  # out == in (issue 14)
        relabel_archive(FakeRelabeler(), folder, folder, progress=False)
    assert output_files(folder) == before
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(outside, target_is_directory=True)
    summary = relabel_archive(FakeRelabeler(), folder, out, recursive=True, progress=False)
    assert dict(summary["failures"])["sub/deep"].count("outside the output folder") == 1
    assert list(outside.iterdir()) == [] and summary["done"] == 2
    assert {k: v for k, v in output_files(folder).items() if not k.endswith("manifest.jsonl")} == before


def test_nested_output_is_refused_and_name_clashes_fail(tmp_path):
    folder = tmp_path / "in"
    make_archive(folder, n=3)
    with pytest.raises(InputError, match="inside the input folder"):  # issue 14: never reread outputs
        relabel_archive(FakeRelabeler(), folder, folder / "labels", recursive=True, progress=False)
    other = make_case(tmp_path / "other" / "case00.nii.gz", 7)
    summary = relabel_archive(FakeRelabeler(), [folder / "case00.nii.gz", other], tmp_path / "o2", progress=False)
    assert summary["total"] == 2  # ids relative to the common folder: in/case00, other/case00
    lst = tmp_path / "lists" / "clash.txt"  # a list file's cases are named by their file names
    lst.parent.mkdir()
    lst.write_text(f"../in/case00.nii.gz\n{other}\n")
    with pytest.raises(InputError, match="both case 'case00'"):
        relabel_archive(FakeRelabeler(), lst, tmp_path / "o3", progress=False)
    (folder / "case00_confidence.nii.gz").write_bytes((folder / "case00.nii.gz").read_bytes())
    summary = relabel_archive(FakeRelabeler(), folder, tmp_path / "o4", save_confidence=True, progress=False)
    assert "clashes with case case00" in dict(summary["failures"])[str(folder / "case00_confidence.nii.gz")]


# ------------------------------------------------------------------------- kill -9, resume
KILL_SCRIPT = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from test_archive import FakeRelabeler
from atso_fast.archive import relabel_archive
relabel_archive(FakeRelabeler(delay=0.04), {inp!r}, {out!r}, recursive=True,
                save_confidence=True, resume=True, progress=False)
"""


def _ok_rows(path: Path) -> int:
    try:
        return sum('"status": "ok"' in line for line in path.read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    folder = tmp_path / "in"
    for i in range(24):
        make_case(folder / f"c{i:02d}.nii.gz", i, shape_xyz=(20, 18, 16))
    out = tmp_path / "killed"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), inp=str(folder), out=str(out)))
    for wait_rows in (3, 9):  # kill twice at different points, resuming in between
        proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while _ok_rows(out / "manifest.jsonl") < wait_rows and proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("the archive subprocess made no progress")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err.decode()
    finished = Manifest(out / "manifest.jsonl").completed()
    assert 9 <= len(finished) < 24
    summary = relabel_archive(
        FakeRelabeler(), folder, out, recursive=True, save_confidence=True, resume=True, progress=False
    )
    assert summary["skipped"] == len(finished) and summary["failed"] == 0
    assert summary["done"] + summary["skipped"] == 24
    reference = tmp_path / "reference"
    relabel_archive(FakeRelabeler(), folder, reference, recursive=True, save_confidence=True, progress=False)
    killed, clean = output_files(out), output_files(reference)
    assert sorted(killed) == sorted(clean) and len(clean) == 48  # no temp files left either
    assert all(killed[name] == clean[name] for name in clean)
    assert set(statuses(out).values()) == {"ok"} and len(statuses(out)) == 24


# ------------------------------------------------------------------------------- real data
@pytest.mark.realdata
@pytest.mark.skipif(not REAL_IMAGES, reason=REAL_DATA_MISSING)
def test_real_nifti_round_trip_keeps_affine_shape_orientation(tmp_path):
    out = tmp_path / "out"
    summary = relabel_archive(FakeRelabeler(), REAL_IMAGES, out, readers=2, writers=2, progress=False)
    assert summary["failed"] == 0 and summary["done"] == len(REAL_IMAGES)
    for src in REAL_IMAGES:
        reference = nib.load(src)
        written = nib.load(out / src.parent.name / "image.nii.gz")
        assert written.shape == reference.shape and written.get_data_dtype() == np.uint8
        np.testing.assert_allclose(written.affine, reference.affine)
        assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(reference.affine)
        for key in ("qform_code", "sform_code"):
            assert int(written.header[key]) == int(reference.header[key])
        expected = fake_result(np.asanyarray(reference.dataobj).T).labels
        np.testing.assert_array_equal(np.asanyarray(written.dataobj), expected.T)


# ----------------------------------------------------------------------- the real engine
def test_real_relabeler_through_the_archive(tmp_path):
    import torch

    conv = torch.nn.Conv3d(1, 3, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1, 1))
        conv.bias.zero_()
    relabeler = Relabeler.from_module(conv.eval(), window=(4, 4, 4), num_classes=3)
    make_archive(tmp_path / "in", n=3)
    summary = relabel_archive(relabeler, tmp_path / "in", tmp_path / "out", save_confidence=True, progress=False)
    assert summary["failed"] == 0, summary["failures"]
    image, _ = read_volume(tmp_path / "in" / "case00.nii.gz")
    labels = np.asanyarray(nib.load(tmp_path / "out" / "case00.nii.gz").dataobj).T
    np.testing.assert_array_equal(labels[image > 0], 2)
    np.testing.assert_array_equal(labels[image < 0], 0)


def test_cli_end_to_end_with_an_exported_package(tmp_path, capsys):
    import torch

    conv = torch.nn.Conv3d(1, 3, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1, 1))
        conv.bias.zero_()
    model = export_model(conv.eval(), tmp_path / "model", window=(8, 8, 8), num_classes=3)
    make_archive(tmp_path / "in", n=3)
    out = tmp_path / "out"
    argv = [str(model), str(tmp_path / "in"), str(out), "--save-confidence", "--json"]
    assert cli_main(argv + ["--runtime", "onnxruntime"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["done"] == 2 and summary["runtime"] == "onnxruntime"
    image, _ = read_volume(tmp_path / "in" / "case00.nii.gz")
    labels = np.asanyarray(nib.load(out / "case00.nii.gz").dataobj).T
    np.testing.assert_array_equal(labels[image > 0], 2)
    np.testing.assert_array_equal(labels[image < 0], 0)
    assert (out / "case00_confidence.nii.gz").is_file()


def test_summary_names_a_duck_typed_relabelers_runtime(tmp_path):
    make_archive(tmp_path / "in", n=3)
    fake = FakeRelabeler()
    fake.runtime_label = "mine"  # a runtime label but no .runtime object
    summary = relabel_archive(fake, tmp_path / "in", tmp_path / "out", recursive=True, progress=False)
    assert summary["runtime"] == "mine"
