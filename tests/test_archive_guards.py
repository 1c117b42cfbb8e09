"""Up-front guards of a bulk run (issue 26): links, locks, mixed resumes, empty inputs,
unwritable outputs, temp folders left by kill -9."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from test_archive import FakeRelabeler, make_case

from atso_fast.archive import relabel_archive
from atso_fast.archive.plan import run_lock
from atso_fast.io import InputError, Manifest
from atso_fast.io.atomic import temp_path


class Fingerprinted(FakeRelabeler):
    def __init__(self, fingerprint: str) -> None:
        super().__init__()
        self.fingerprint = fingerprint


def archive(tmp_path, n=3):
    for i in range(n):
        make_case(tmp_path / "in" / f"c{i}.nii.gz", i)
    return tmp_path / "in"


def test_a_linked_manifest_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "elsewhere.sh"
    target.write_text("echo hi\n")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(target, out / "manifest.jsonl")
    with pytest.raises(InputError, match="symbolic link"):
        relabel_archive(FakeRelabeler(), archive(tmp_path), out, progress=False)
    assert target.read_text() == "echo hi\n"


def test_the_manifest_is_never_appended_through_a_link(tmp_path):
    target = tmp_path / "elsewhere.sh"
    target.write_text("")
    os.symlink(target, tmp_path / "manifest.jsonl")
    with pytest.raises(OSError), Manifest(tmp_path / "manifest.jsonl") as manifest:
        manifest.append({"case_id": "$(touch pwned)", "status": "ok"})
    assert target.read_text() == ""


def test_a_second_run_on_the_same_part_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with run_lock(out, 0, 1):
        with pytest.raises(InputError, match="another atso-fast run is writing part 0 of 1"):
            relabel_archive(FakeRelabeler(), archive(tmp_path), out, progress=False, resume=True)
        with run_lock(out, 1, 2):  # another part of the same folder is fine
            pass
    summary = relabel_archive(FakeRelabeler(), archive(tmp_path), out, progress=False)
    assert summary["done"] == 3 and not list(out.glob(".atso-fast-*.lock"))


def test_resume_with_another_model_or_settings_is_refused(tmp_path):
    inputs, out = archive(tmp_path), tmp_path / "out"
    relabel_archive(Fingerprinted("aaaa"), inputs, out, progress=False)
    assert {r["run"] for r in Manifest(out / "manifest.jsonl").rows()} == {"aaaa"}
    make_case(inputs / "c9.nii.gz", 9)
    with pytest.raises(InputError, match=r"3 finished cases .* another model or settings .*this run is bbbb"):
        relabel_archive(Fingerprinted("bbbb"), inputs, out, progress=False, resume=True)
    assert relabel_archive(Fingerprinted("aaaa"), inputs, out, progress=False, resume=True)["done"] == 1
    assert relabel_archive(Fingerprinted("bbbb"), inputs, out, progress=False, overwrite=True)["done"] == 4


def test_an_input_with_nothing_to_relabel_is_an_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("hello")
    (tmp_path / "in" / ".hidden.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="nothing to relabel.*--recursive"):
        relabel_archive(FakeRelabeler(), tmp_path / "in", tmp_path / "out", progress=False)


def test_an_unwritable_output_folder_is_refused_before_any_case(tmp_path, monkeypatch):
    fake = FakeRelabeler()

    def denied(*args, **kwargs):  # root writes anywhere: deny as the kernel does for others
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    with pytest.raises(InputError, match="output folder cannot be written"):
        relabel_archive(fake, archive(tmp_path), tmp_path / "out", progress=False)
    assert fake.calls == 0


def test_resume_removes_temp_folders_a_killed_writer_left(tmp_path):
    inputs, out = archive(tmp_path), tmp_path / "out"
    out.mkdir()
    stale = temp_path(out / "c0.nii.gz", pid=2**22 + 12345, folder=True)  # no such process
    stale.mkdir()
    (stale / "c0.nii.gz").write_bytes(b"partial")
    relabel_archive(FakeRelabeler(), inputs, out, progress=False, resume=True)
    assert not stale.exists()
    np.testing.assert_equal(
        sorted(p.name for p in out.iterdir()), sorted(["manifest.jsonl", "c0.nii.gz", "c1.nii.gz", "c2.nii.gz"])
    )


def test_a_network_emitting_nan_fails_the_case_not_ok(tmp_path):
    import torch

    from atso_fast.engine import Relabeler

    class NaNNet(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 2, *x.shape[2:])
            out[:, :, 0] = float("nan")
            return out

    relabeler = Relabeler.from_module(NaNNet(), window=(4, 8, 8), num_classes=2)
    summary = relabel_archive(relabeler, archive(tmp_path, n=1), tmp_path / "out", progress=False)
    row = Manifest(tmp_path / "out" / "manifest.jsonl").latest()["c0"]
    assert summary["failed"] == 1 and row["status"] == "failed" and "NaN/inf" in row["error"], row


def test_a_package_with_a_nan_normalisation_is_refused():
    from atso_fast.package.normalize import check_policy

    with pytest.raises(ValueError, match="finite"):
        check_policy({"scheme": "ct", "mean": float("nan"), "std": 1.0, "clip": [0, 1]})


def test_one_line_per_case_when_stderr_is_not_a_terminal(tmp_path, capsys):
    inputs = archive(tmp_path)
    (inputs / "bad.nii.gz").write_bytes(b"\x1f\x8b broken")
    relabel_archive(FakeRelabeler(), inputs, tmp_path / "out", progress=None)
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.startswith("atso-fast relabel: [")]
    assert len(lines) == 4 and lines[-1].startswith("atso-fast relabel: [4/4] case c") and "ETA" in lines[-1]
    assert [line for line in err if "case bad" in line] == [lines[0]] and "case bad failed: " in lines[0]
    relabel_archive(FakeRelabeler(), inputs, tmp_path / "out2", progress=False)
    quiet = capsys.readouterr().err.splitlines()  # without progress: the failure alone, no counts
    assert len(quiet) == 1 and quiet[0].startswith("atso-fast relabel: case bad failed: ")


def test_a_full_disk_never_stops_the_run_nor_hides_a_failure(tmp_path, monkeypatch, capsys):
    inputs, out = archive(tmp_path), tmp_path / "out"
    (inputs / "bad.nii.gz").write_bytes(b"\x1f\x8b broken")

    def full(self, row):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Manifest, "append", full)
    summary = relabel_archive(FakeRelabeler(), inputs, out, progress=False)
    assert summary["total"] == 4 and summary["failed"] == 4 and summary["done"] == 0
    err = capsys.readouterr().err
    assert "case bad failed" in err and err.count("manifest row could not be written: No space left") == 4
