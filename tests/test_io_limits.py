"""One file never stops a run (issue 26): sizes are checked against the memory budget before
allocating, gzip data past the image are never inflated, sparse tails are never read, bad voxel
sizes are refused, and FIFOs are refused without blocking."""

from __future__ import annotations

import gzip
import os
import zipfile

import nibabel as nib
import numpy as np
import pytest
from test_archive_hardening import no_hang

from atso_fast.engine.preprocess import plan_geometry
from atso_fast.io import InputError, read_volume
from atso_fast.io import limits as limits_mod
from atso_fast.io.limits import check_bytes, memory_budget
from atso_fast.package import ModelPackage


def nifti_bytes(data: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> bytes:
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_zooms(zooms)
    return img.to_bytes()


@pytest.fixture
def small_budget(monkeypatch):
    monkeypatch.setattr(limits_mod, "memory_budget", lambda: 64 << 10)  # 64 KiB: 16 KiB per decoded scan


def test_memory_budget_is_positive_here():
    budget = memory_budget()
    assert budget is not None and budget > 0


def test_check_bytes_names_path_and_numbers():
    check_bytes("a.nii", 100, "the image", budget=1000)
    with pytest.raises(InputError, match=r"a.nii: the image needs 0.00 GiB, more than .*refused"):
        check_bytes("a.nii", 400, "the image", share=4, budget=1000)


@pytest.mark.parametrize("name", ["big.nii", "big.nii.gz", "big.npy", "big.npz"])
def test_a_decoded_size_over_the_budget_is_refused(tmp_path, small_budget, name):
    data = np.zeros((32, 32, 32), np.int16)  # 64 KiB decoded
    path = tmp_path / name
    if name.endswith(".npz"):
        np.savez_compressed(path, image=data)
    elif name.endswith(".npy"):
        np.save(path, data)
    else:
        raw = nifti_bytes(data)
        path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    with pytest.raises(InputError, match=rf"{name}: the decoded image needs"):
        read_volume(path)


def test_gzip_data_past_the_image_are_refused_not_inflated(tmp_path):
    raw = nifti_bytes(np.ones((4, 5, 6), np.int16))
    path = tmp_path / "bomb.nii.gz"
    with gzip.open(path, "wb", compresslevel=1) as handle:  # the image, then 64 MiB of zeros
        handle.write(raw)
        for _ in range(16):
            handle.write(bytes(4 << 20))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(InputError, match="go on past the image"):
        read_volume(path)


def test_a_sparse_tail_is_never_read(tmp_path):
    raw = nifti_bytes(np.arange(120, dtype=np.int16).reshape(4, 5, 6))
    path = tmp_path / "sparse.nii"
    path.write_bytes(raw)
    with open(path, "r+b") as handle:
        handle.truncate(8 << 30)
    array, _ = read_volume(path)
    np.testing.assert_array_equal(array, np.arange(120, dtype=np.int16).reshape(4, 5, 6).T)


def test_a_trailing_gzip_pad_within_a_megabyte_reads(tmp_path):
    raw = nifti_bytes(np.ones((4, 5, 6), np.int16)) + bytes(1000)
    path = tmp_path / "pad.nii.gz"
    path.write_bytes(gzip.compress(raw))
    assert read_volume(path)[0].shape == (6, 5, 4)


def test_npz_with_a_pickle_member_is_refused(tmp_path):
    path = tmp_path / "p.npz"
    np.savez(path, image=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="pickle"):
        read_volume(path)
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    with pytest.raises(InputError, match="no arrays"):
        read_volume(tmp_path / "empty.npz")


@pytest.mark.parametrize("zooms", [(0.0, 1.0, 1.0), (1.0, np.nan, 1.0), (1.0, 1.0, np.inf)])
def test_zero_or_non_finite_voxel_sizes_are_refused(tmp_path, zooms):
    path = tmp_path / "z.nii"
    raw = bytearray(nifti_bytes(np.ones((4, 5, 6), np.int16)))
    pixdim = np.frombuffer(raw, np.float32, 8, 76).copy()
    pixdim[1:4] = zooms
    raw[76:108] = pixdim.tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="invalid voxel size"):
        read_volume(path)


@pytest.mark.parametrize("name", ["pipe.nii.gz", "pipe.npy", "pipe.npz", "pipe.nrrd"])
def test_a_fifo_is_refused_without_blocking(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="FIFO"):
        no_hang(read_volume, fifo, timeout=20, fifos=(fifo,))


def test_a_header_claiming_huge_voxels_is_refused_before_resampling(monkeypatch):
    package = ModelPackage.__new__(ModelPackage)
    monkeypatch.setattr(limits_mod, "memory_budget", lambda: 1 << 30)
    spec = {
        "orientation": "as-stored",
        "transpose": None,
        "crop_to_nonzero": False,
        "resampling": {
            "separate_z": None,
            "anisotropy_threshold": 3.0,
            "probabilities_order": 1,
            "probabilities_order_z": 0,
        },
    }
    monkeypatch.setattr(ModelPackage, "preprocessing", property(lambda self: spec), raising=False)
    monkeypatch.setattr(ModelPackage, "spacing", property(lambda self: (1.0, 1.0, 1.0)), raising=False)
    vol = np.zeros((1, 20, 20, 20), np.float32)
    with pytest.raises(InputError, match=r"resampling \(20, 20, 20\) voxels at \(100.0, 100.0, 100.0\) mm"):
        plan_geometry(vol, package, (100.0, 100.0, 100.0), None)
    geom = plan_geometry(vol, package, (2.0, 2.0, 2.0), None)
    assert geom.target == (40, 40, 40)


def test_uint16_labels_stay_uint16_whatever_the_case_holds(tmp_path):
    from atso_fast.io import write_labels

    raw = nifti_bytes(np.ones((4, 5, 6), np.int16))
    (tmp_path / "a.nii").write_bytes(raw)
    _, meta = read_volume(tmp_path / "a.nii")
    labels = np.zeros(meta.spatial_shape, np.uint16)  # a 300-class package, this case only class 0
    write_labels(tmp_path / "seg.nii", labels, meta)
    assert read_volume(tmp_path / "seg.nii")[0].dtype == np.uint16
    write_labels(tmp_path / "seg8.nii", labels.astype(np.int64), meta)
    assert read_volume(tmp_path / "seg8.nii")[0].dtype == np.uint8
