"""No input can stop or hang a bulk run (issue 14, items 4-9 and 13).

Every test that could hang (a FIFO opened for reading blocks until a writer appears) runs the
archive under :func:`no_hang`, which fails the test instead of hanging CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from test_archive import FakeRelabeler, make_case

from atso_fast.archive import relabel_archive
from atso_fast.io import InputError, Manifest, atomic_write_bytes, list_inputs


def no_hang(fn, *args, timeout: float = 30, fifos: tuple[Path, ...] = (), **kwargs):
    """``fn(*args, **kwargs)`` in a thread; fail (after unblocking ``fifos``) if it outlives ``timeout``."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the test's thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        for fifo in fifos:  # a writer end gives blocked readers EOF, so the thread can end
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        worker.join(5)
        pytest.fail(f"{getattr(fn, '__name__', fn)} hung for {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def rows(out: Path) -> dict[str, dict]:
    return Manifest(out / "manifest.jsonl").latest()


def all_rows(out: Path) -> list[dict]:
    return Manifest(out / "manifest.jsonl").rows()


def make_unreadable(folder: Path, monkeypatch) -> None:
    """Deny listing ``folder``: chmod 000 for a normal user; root ignores permissions, so
    there listing it is made to fail the way the kernel fails it for everyone else."""
    if os.geteuid() != 0:
        folder.chmod(0)  # restored by _restore_modes
        return
    real_scandir = os.scandir

    def scandir(path="."):
        if os.path.realpath(path) == os.path.realpath(folder):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.fixture(autouse=True)
def _restore_modes(tmp_path):
    yield
    for here, dirs, _ in os.walk(tmp_path):
        for d in dirs:
            try:
                os.chmod(os.path.join(here, d), 0o755)
            except OSError:
                pass


# ------------------------------------------------------------------------------ item 4
def test_a_fifo_in_a_folder_is_one_failed_row_and_never_hangs(tmp_path):
    folder = tmp_path / "in"
    for i in range(3):
        make_case(folder / f"ok{i}.nii.gz", i)
    os.mkfifo(folder / "pipe.nii.gz")
    os.mkfifo(folder / "pipe2.npy")
    out = tmp_path / "out"
    summary = no_hang(
        relabel_archive,
        FakeRelabeler(),
        folder,
        out,
        progress=False,
        fifos=(folder / "pipe.nii.gz", folder / "pipe2.npy"),
    )
    assert (summary["done"], summary["failed"]) == (3, 2)
    got = rows(out)
    for cid in ("pipe", "pipe2"):
        assert got[cid]["status"] == "failed" and "FIFO" in got[cid]["error"], got[cid]
        assert "pipe" in got[cid]["error"]


def test_a_fifo_in_a_list_file_or_as_the_list_never_hangs(tmp_path):
    folder = tmp_path / "in"
    make_case(folder / "ok.nii.gz", 1)
    os.mkfifo(folder / "pipe.nii.gz")
    lst = tmp_path / "cases.txt"
    lst.write_text(f"{folder / 'ok.nii.gz'}\n{folder / 'pipe.nii.gz'}\n")
    out = tmp_path / "out"
    summary = no_hang(relabel_archive, FakeRelabeler(), lst, out, progress=False, fifos=(folder / "pipe.nii.gz",))
    assert (summary["done"], summary["failed"]) == (1, 1) and "FIFO" in rows(out)["pipe"]["error"]
    os.mkfifo(tmp_path / "fifo.txt")
    with pytest.raises(InputError, match="FIFO"):
        no_hang(
            relabel_archive,
            FakeRelabeler(),
            tmp_path / "fifo.txt",
            tmp_path / "o2",
            progress=False,
            fifos=(tmp_path / "fifo.txt",),
        )


def test_a_socket_or_device_is_refused_without_opening_it(tmp_path):
    import socket

    folder = tmp_path / "in"
    make_case(folder / "ok.nii.gz", 1)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock.nii.gz"))
    (folder / "zero.npy").symlink_to("/dev/zero")
    try:
        summary = no_hang(relabel_archive, FakeRelabeler(), folder, tmp_path / "out", progress=False)
    finally:
        sock.close()
    got = rows(tmp_path / "out")
    assert summary["failed"] == 2 and "socket" in got["sock"]["error"] and "device" in got["zero"]["error"]


# ------------------------------------------------------------------------------ item 5
def test_an_unreadable_subfolder_is_a_failed_entry_and_the_run_goes_on(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    make_case(folder / "a.nii.gz", 1)
    make_case(folder / "locked" / "b.nii.gz", 2)
    make_case(folder / "open" / "c.nii.gz", 3)
    make_unreadable(folder / "locked", monkeypatch)
    out = tmp_path / "out"
    summary = relabel_archive(FakeRelabeler(), folder, out, recursive=True, progress=False)
    assert (summary["done"], summary["failed"]) == (2, 1)
    got = rows(out)
    assert got["a"]["status"] == got["open/c"]["status"] == "ok"
    row = got["locked/"]
    assert row["status"] == "failed" and "cannot list folder" in row["error"]
    assert "permission denied" in row["error"].lower() and "locked" in row["error"]


# ------------------------------------------------------------------------------ item 6
def test_case_ids_clashing_across_formats_are_refused_up_front(tmp_path):
    folder = tmp_path / "in"
    make_case(folder / "a.nii.gz", 1)
    np.save(folder / "a.npy", np.zeros((3, 4, 5), np.float32))
    make_case(folder / "b.nii.gz", 2)
    with pytest.raises(InputError) as info:
        relabel_archive(FakeRelabeler(), folder, tmp_path / "out", progress=False)
    assert "a.nii.gz" in str(info.value) and "a.npy" in str(info.value) and "'a'" in str(info.value)
    assert not (tmp_path / "out" / "manifest.jsonl").exists()
    make_case(folder / "c_0000.nii.gz", 3)  # nnU-Net's channel suffix: also case "c"
    make_case(folder / "c.nii.gz", 4)
    (folder / "a.npy").unlink()
    with pytest.raises(InputError, match="c_0000.nii.gz"):
        relabel_archive(FakeRelabeler(), folder, tmp_path / "out", progress=False)


def test_a_clash_in_another_part_is_refused_by_every_part(tmp_path):
    folder = tmp_path / "in"
    for name in ("a", "b", "c", "d"):
        make_case(folder / f"{name}.nii.gz", ord(name))
    np.save(folder / "d.npy", np.zeros((3, 4, 5), np.float32))
    for part in range(2):
        with pytest.raises(InputError, match="d.npy"):
            relabel_archive(FakeRelabeler(), folder, tmp_path / "out", num_parts=2, part_id=part, progress=False)


# ------------------------------------------------------------------------------ item 7
def test_an_output_folder_inside_the_input_folder_is_refused(tmp_path):
    folder = tmp_path / "in"
    make_case(folder / "a.nii.gz", 1)
    for out in (folder, folder / "labels", folder / "x" / "y"):
        with pytest.raises(InputError, match="inside the input folder"):
            relabel_archive(FakeRelabeler(), folder, out, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["a.nii.gz"]
    (tmp_path / "link").symlink_to(folder, target_is_directory=True)
    with pytest.raises(InputError, match="inside the input folder"):
        relabel_archive(FakeRelabeler(), folder, tmp_path / "link" / "out", progress=False)


def test_list_entries_inside_the_output_folder_are_never_read(tmp_path):
    folder = tmp_path / "in"
    make_case(folder / "a.nii.gz", 1)
    out = tmp_path / "out"
    relabel_archive(FakeRelabeler(), folder, out, progress=False)
    lst = tmp_path / "cases.txt"
    lst.write_text(f"{folder / 'a.nii.gz'}\n{out / 'a.nii.gz'}\n")
    with pytest.raises(InputError, match="inside the output folder"):
        relabel_archive(FakeRelabeler(), lst, out, overwrite=True, progress=False)


# ------------------------------------------------------------------------------ item 8
def test_rerun_without_resume_is_refused_and_overwrite_replaces_rows(tmp_path):
    folder = tmp_path / "in"
    for i in range(3):
        make_case(folder / f"c{i}.nii.gz", i)
    out = tmp_path / "out"
    relabel_archive(FakeRelabeler(), folder, out, progress=False)
    with pytest.raises(InputError, match="3 cases already done here.*--resume.*--overwrite"):
        relabel_archive(FakeRelabeler(), folder, out, progress=False)
    fake = FakeRelabeler()
    summary = relabel_archive(fake, folder, out, overwrite=True, progress=False)
    assert (summary["done"], fake.calls) == (3, 3)
    ids = [r["case_id"] for r in all_rows(out)]
    assert sorted(ids) == ["c0", "c1", "c2"]  # exactly one row per case
    with pytest.raises(ValueError, match="resume.*overwrite"):
        relabel_archive(FakeRelabeler(), folder, out, resume=True, overwrite=True, progress=False)


def test_a_retried_case_keeps_one_manifest_row(tmp_path):
    folder = tmp_path / "in"
    make_case(folder / "a.nii.gz", 1)
    (folder / "b.nii.gz").write_bytes(b"\x1f\x8b broken")
    out = tmp_path / "out"
    relabel_archive(FakeRelabeler(), folder, out, progress=False)
    for _ in range(2):  # b keeps failing: retried each time, still one row
        relabel_archive(FakeRelabeler(), folder, out, resume=True, progress=False)
    assert sorted(r["case_id"] for r in all_rows(out)) == ["a", "b"]
    make_case(folder / "b.nii.gz", 2)
    summary = relabel_archive(FakeRelabeler(), folder, out, resume=True, progress=False)
    assert (summary["done"], summary["skipped"]) == (1, 1)
    assert sorted(r["case_id"] for r in all_rows(out)) == ["a", "b"]
    assert rows(out)["b"]["status"] == "ok"


# ------------------------------------------------------------------------------ item 9
SLEEPER = "import time; time.sleep(60)"


def test_stale_temp_cleanup_spares_a_live_process(tmp_path):
    folder = tmp_path / "in"
    make_case(folder / "a.nii.gz", 1)
    make_case(folder / "b.nii.gz", 2)
    out = tmp_path / "out"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", SLEEPER])
    try:
        # a temp file the live process would write (its PID in the name, as atomic_write_bytes names it)
        from atso_fast.io.atomic import temp_path

        live_tmp = temp_path(out / "a.nii.gz", pid=live.pid)
        dead = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
        )
        dead_tmp = out / f".b.nii.gz.atso-{int(dead.stdout)}-deadbeef.tmp"
        dead_manifest_tmp = out / f".manifest.jsonl.atso-{int(dead.stdout)}-0badf00d.tmp"  # killed mid-rewrite
        for tmp in (live_tmp, dead_tmp, dead_manifest_tmp):
            tmp.write_bytes(b"partial")
        assert live_tmp.name.startswith(".a.nii.gz.atso-")
        relabel_archive(FakeRelabeler(), folder, out, progress=False)
        assert not dead_tmp.exists() and not dead_manifest_tmp.exists(), "a dead process's temp file is stale"
        assert live_tmp.exists(), "the temp file of a live process was deleted"
    finally:
        live.kill()
        live.wait()


def test_a_folder_named_like_an_image_is_a_failed_row_and_hidden_files_are_reported(tmp_path, capsys):
    folder = tmp_path / "in"
    make_case(folder / "a.nii.gz", 1)
    (folder / "x.nii.gz").mkdir()
    make_case(folder / ".hidden.nii.gz", 2)
    make_case(folder / "._a.nii.gz", 3)  # macOS resource fork
    out = tmp_path / "out"
    summary = relabel_archive(FakeRelabeler(), folder, out, progress=False)
    assert (summary["done"], summary["failed"]) == (1, 1)
    assert "directory" in rows(out)["x"]["error"]
    skipped = dict(summary["skipped_inputs"])
    assert sorted(Path(p).name for p in skipped) == ["._a.nii.gz", ".hidden.nii.gz"]
    assert all("hidden" in why for why in skipped.values())
    err = capsys.readouterr().err
    assert ".hidden.nii.gz" in err and "._a.nii.gz" in err


# ----------------------------------------------------------------------------- item 13
def test_list_file_outputs_land_at_the_case_name_and_inputs_are_absolute(tmp_path, monkeypatch):
    data = tmp_path / "data" / "imagesTs"
    make_case(data / "case_a_0000.nii.gz", 1)
    make_case(data / "sub" / "case_b.nii.gz", 2)
    lst = tmp_path / "lists" / "test.txt"
    lst.parent.mkdir()
    lst.write_text("../data/imagesTs/case_a_0000.nii.gz\n../data/imagesTs/sub/case_b.nii.gz\n")
    monkeypatch.chdir(tmp_path)
    out = Path("out")  # relative on purpose
    summary = relabel_archive(FakeRelabeler(), Path("lists/test.txt"), out, progress=False)
    assert summary["done"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["case_a.nii.gz", "case_b.nii.gz", "manifest.jsonl"]
    for row in rows(out).values():
        assert os.path.isabs(row["input"]) and Path(row["input"]).is_file(), row


def test_list_files_may_name_files_in_any_encoding(tmp_path):
    folder = tmp_path / "in"
    name = "caf\xe9.nii.gz"
    make_case(folder / "plain.nii.gz", 1)
    raw = os.fsencode(str(folder)) + b"/caf\xe9.nii.gz"  # latin-1 bytes on disk, not UTF-8
    with open(raw, "wb") as handle:
        handle.write((folder / "plain.nii.gz").read_bytes())
    lst = tmp_path / "cases.txt"
    lst.write_bytes(os.fsencode(str(folder / "plain.nii.gz")) + b"\n" + raw + b"\n")
    summary = relabel_archive(FakeRelabeler(), lst, tmp_path / "out", progress=False)
    assert (summary["done"], summary["failed"]) == (2, 0), summary["failures"]
    assert len(list_inputs(lst)) == 2 and name not in os.listdir(folder)


def test_a_nul_byte_in_a_list_file_is_a_failed_entry(tmp_path):
    make_case(tmp_path / "a.nii.gz", 1)
    lst = tmp_path / "cases.txt"
    lst.write_bytes(b"a.nii.gz\nb\x00.nii.gz\n")
    summary = relabel_archive(FakeRelabeler(), lst, tmp_path / "out", progress=False)
    assert (summary["done"], summary["failed"]) == (1, 1)
    assert "NUL" in summary["failures"][0][1] and summary["failures"][0][0] == "cases.txt:2"


def test_atomic_temp_names_carry_the_writer(tmp_path):
    target = tmp_path / "x.nii.gz"
    atomic_write_bytes(target, b"data")
    assert target.read_bytes() == b"data" and sorted(os.listdir(tmp_path)) == ["x.nii.gz"]
