"""NRRD/MetaImage headers never lead a read out of the input (issue 26: file disclosure, hangs).

A detached header names its data file; ITK follows any name. Each attack below must give one
clear ``InputError`` naming the file, never the named file's bytes and never a hang; a bulk run
records it as one failed case and finishes the others.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from test_archive import FakeRelabeler, make_case
from test_archive_hardening import no_hang, rows

from atso_fast.archive import relabel_archive
from atso_fast.io import InputError, read_volume
from atso_fast.io import limits as limits_mod
from atso_fast.io.sitk_headers import parse_header

sitk = pytest.importorskip("SimpleITK")

SHAPE = (3, 4, 5)  # (Z, Y, X): 60 int16 voxels, 120 bytes


def nhdr(folder: Path, data_file: str, *, name: str = "scan.nhdr", encoding: str = "raw") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = (
        f"NRRD0004\ntype: short\ndimension: 3\nsizes: {SHAPE[2]} {SHAPE[1]} {SHAPE[0]}\n"
        f"endian: little\nencoding: {encoding}\ndata file: {data_file}\n"
    )
    path = folder / name
    path.write_text(text)
    return path


def mhd(folder: Path, data_file: str, *, name: str = "scan.mhd") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = (
        f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"CompressedData = False\nDimSize = {SHAPE[2]} {SHAPE[1]} {SHAPE[0]}\nElementType = MET_SHORT\n"
        f"ElementDataFile = {data_file}\n"
    )
    path = folder / name
    path.write_text(text)
    return path


def raw_bytes(seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(-100, 100, SHAPE).astype("<i2").tobytes()


@pytest.mark.parametrize("make", [nhdr, mhd])
def test_detached_data_file_in_the_same_folder_reads(tmp_path, make):
    (tmp_path / "scan.raw").write_bytes(raw_bytes())
    array, meta = read_volume(make(tmp_path, "scan.raw"))
    np.testing.assert_array_equal(array, np.frombuffer(raw_bytes(), "<i2").reshape(SHAPE))
    assert meta.spatial_shape == SHAPE


@pytest.mark.parametrize("make", [nhdr, mhd])
@pytest.mark.parametrize(
    "name", ["/etc/passwd", "../secret.raw", "sub/scan.raw", "/dev/stdin", "LIST", "scan%03d.raw 1 3 1", "..", "."]
)
def test_data_file_outside_the_folder_is_refused(tmp_path, make, name):
    secret = tmp_path / "secret.raw"
    secret.write_bytes(raw_bytes(1))
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "scan.raw").write_bytes(raw_bytes())
    header = make(tmp_path / "in", name)
    with pytest.raises(InputError, match="refused") as info:
        no_hang(read_volume, header, timeout=20)
    assert str(header) in str(info.value)


@pytest.mark.parametrize("make", [nhdr, mhd])
def test_data_file_linked_out_of_the_folder_is_refused(tmp_path, make):
    secret = tmp_path / "secret.raw"
    secret.write_bytes(raw_bytes(1))
    (tmp_path / "in").mkdir()
    os.symlink(secret, tmp_path / "in" / "scan.raw")
    with pytest.raises(InputError, match="link out of the header's folder"):
        read_volume(make(tmp_path / "in", "scan.raw"))


def test_data_file_linked_inside_the_folder_reads(tmp_path):
    (tmp_path / "real.raw").write_bytes(raw_bytes())
    os.symlink("real.raw", tmp_path / "scan.raw")
    array, _ = read_volume(nhdr(tmp_path, "scan.raw"))
    assert array.shape == SHAPE


@pytest.mark.parametrize("make", [nhdr, mhd])
def test_fifo_data_file_is_refused_without_hanging(tmp_path, make):
    fifo = tmp_path / "scan.raw"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="FIFO"):
        no_hang(read_volume, make(tmp_path, "scan.raw"), timeout=20, fifos=(fifo,))


@pytest.mark.parametrize("make", [nhdr, mhd])
@pytest.mark.parametrize("size, problem", [(119, "truncated"), (120 + (2 << 20), "more than")])
def test_data_file_of_the_wrong_size_is_refused(tmp_path, make, size, problem):
    with open(tmp_path / "scan.raw", "wb") as handle:
        handle.truncate(size)  # sparse: no disk used
    with pytest.raises(InputError, match=problem):
        read_volume(make(tmp_path, "scan.raw"))


def test_attached_nrrd_padded_to_gigabytes_is_refused(tmp_path):
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros(SHAPE, np.int16)), str(path))
    with open(path, "r+b") as handle:
        handle.truncate(8 << 30)  # a sparse 8 GiB tail
    with pytest.raises(InputError, match="more than"):
        read_volume(path)


def test_decoded_size_over_the_budget_is_refused_before_reading(tmp_path, monkeypatch):
    (tmp_path / "scan.raw").write_bytes(raw_bytes())
    header = nhdr(tmp_path, "scan.raw")
    monkeypatch.setattr(limits_mod, "memory_budget", lambda: 400)  # 1/4 of it: 100 bytes < 120
    with pytest.raises(InputError, match=r"scan.nhdr: the decoded image needs"):
        read_volume(header)


@pytest.mark.parametrize(
    "head, problem",
    [
        (b"NRRD0004\ntype: short\nsizes: 0 4\n\n", "positive sizes"),
        (b"NRRD0004\ntype: block\nsizes: 2 4\n\n", "unsupported NRRD type"),
        (b"NRRD0004\ntype: short\n\n", "lacks 'sizes'"),
        (b"NDims = 3\nDimSize = 2 2 2\nElementType = MET_OPAQUE\nElementDataFile = LOCAL\n", "ElementType"),
        (b"NDims = 3\nDimSize = 2 2\nElementType = MET_SHORT\n", "lacks"),
        (b"garbage without separators\n", "malformed"),
    ],
)
def test_malformed_headers_name_the_problem(tmp_path, head, problem):
    with pytest.raises(InputError, match=problem):
        parse_header(head, tmp_path / "x", nrrd=head.startswith(b"NRRD"))


def test_a_bulk_run_fails_only_the_disclosing_case(tmp_path):
    folder = tmp_path / "in"
    make_case(folder / "good.nii.gz", 0)
    nhdr(folder, "/etc/passwd", name="evil.nhdr")
    mhd(folder, "../../secret.raw", name="evil2.mhd")
    out = tmp_path / "out"
    summary = no_hang(relabel_archive, FakeRelabeler(), folder, out, progress=False, timeout=60)
    got = rows(out)
    assert (summary["done"], summary["failed"]) == (1, 2) and got["good"]["status"] == "ok"
    for cid in ("evil", "evil2"):
        assert got[cid]["status"] == "failed" and "refused" in got[cid]["error"], got[cid]
    assert not list(out.glob("evil*.nrrd")) and not list(out.glob("evil*.mhd"))


@pytest.mark.parametrize("suffix", [".mha", ".mhd"])
def test_corrupt_compressed_metaimage_is_refused(tmp_path, suffix):
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(4000, dtype=np.int16).reshape(10, 20, 20)), str(path), True)
    data = path if suffix == ".mha" else next(tmp_path.glob("scan.*raw"))
    blob = bytearray(data.read_bytes())
    blob[-40:-20] = b"\xff" * 20  # damage the deflate stream near its end
    data.write_bytes(bytes(blob))
    with pytest.raises(InputError, match="corrupt"):
        read_volume(path)


def test_compressed_metaimage_reads(tmp_path):
    array = np.arange(4000, dtype=np.int16).reshape(10, 20, 20)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "scan.mha"), True)
    np.testing.assert_array_equal(read_volume(tmp_path / "scan.mha")[0], array)
