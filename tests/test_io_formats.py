"""NRRD, MetaImage (.mha, .mhd) and DICOM series through the format registry: geometry round trips."""

from __future__ import annotations

import locale
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from atso_fast.io import (  # noqa: E402
    InputError,
    case_id,
    format_for,
    input_root,
    list_inputs,
    read_volume,
    write_confidence,
    write_labels,
)

SPACING = (0.7, 0.8, 2.5)  # ITK order (x, y, z)
ORIGIN = (-12.5, 30.0, 7.25)
# an oblique direction (rotation about z by 30 degrees, then a flip of y)
_C, _S = np.cos(np.pi / 6), np.sin(np.pi / 6)
DIRECTION = tuple(np.array([[_C, _S, 0], [_S, -_C, 0], [0, 0, 1.0]]).ravel())


def sitk_image(shape_zyx=(5, 6, 7), dtype=np.int16, seed=0):
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1000, size=shape_zyx).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return array, image


def assert_same_grid(a, b):
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_sitk_formats_round_trip_geometry(tmp_path, suffix):
    array, image = sitk_image()
    src = tmp_path / f"scan{suffix}"
    sitk.WriteImage(image, str(src))
    got, meta = read_volume(src)
    np.testing.assert_array_equal(got, array)  # (Z, Y, X), nothing transposed
    assert got.flags.c_contiguous and meta.spatial_shape == array.shape
    assert meta.fmt == suffix[1:]
    np.testing.assert_allclose(meta.spacing, SPACING[::-1])
    np.testing.assert_allclose(meta.origin, ORIGIN)
    np.testing.assert_allclose(meta.direction.ravel(), DIRECTION)
    # the RAS affine maps index (x, y, z) where ITK puts it (LPS -> RAS flips x and y)
    idx = np.array([3, 2, 4])
    world_lps = np.array(image.TransformIndexToPhysicalPoint(tuple(int(i) for i in idx)))
    np.testing.assert_allclose((meta.affine @ [*idx, 1])[:3], world_lps * [-1, -1, 1], atol=1e-6)

    out_suffix = format_for(src).output_suffix
    assert out_suffix == suffix
    labels = (array > 0).astype(np.uint8) + (array > 500)
    out = write_labels(tmp_path / f"labels{out_suffix}", labels, meta)
    written = sitk.ReadImage(str(out))
    assert_same_grid(written, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), labels)
    assert written.GetPixelID() == sitk.sitkUInt8
    conf = write_confidence(tmp_path / f"conf{out_suffix}", (labels * 100).astype(np.uint8), meta)
    assert_same_grid(sitk.ReadImage(str(conf)), image)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # temp files / folders are gone


def test_mhd_writes_header_and_data_file(tmp_path):
    array, image = sitk_image()
    src = tmp_path / "scan.mhd"
    sitk.WriteImage(image, str(src))
    _, meta = read_volume(src)
    write_labels(tmp_path / "seg.mhd", np.ones(array.shape, np.uint8), meta)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "seg.mhd" in names and any(n.startswith("seg.") and n.endswith("raw") for n in names)
    assert "ElementDataFile = seg." in (tmp_path / "seg.mhd").read_text(errors="replace")


def test_sitk_2d_image_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 255, size=(9, 11)).astype(np.uint8)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.25))
    image.SetOrigin((3.0, 4.0))
    sitk.WriteImage(image, str(tmp_path / "a.mha"))
    got, meta = read_volume(tmp_path / "a.mha")
    assert got.shape == (1, 9, 11)
    np.testing.assert_allclose(meta.spacing, (1.0, 0.25, 0.5))
    out = write_labels(tmp_path / "b.mha", (got > 100).astype(np.uint8), meta)
    back = sitk.ReadImage(str(out))
    assert back.GetDimension() == 2 and back.GetSize() == (11, 9)
    np.testing.assert_allclose(back.GetSpacing(), (0.5, 0.25))
    np.testing.assert_allclose(back.GetOrigin(), (3.0, 4.0))


def test_vector_pixels_become_channels(tmp_path):
    rng = np.random.default_rng(2)
    array = rng.normal(size=(4, 5, 6, 2)).astype(np.float32)
    image = sitk.GetImageFromArray(array, isVector=True)
    sitk.WriteImage(image, str(tmp_path / "v.nrrd"))
    got, meta = read_volume(tmp_path / "v.nrrd")
    assert got.shape == (2, 4, 5, 6) and meta.spatial_shape == (4, 5, 6)
    np.testing.assert_array_equal(got, np.moveaxis(array, -1, 0))


@pytest.mark.parametrize("content", [b"", b"NRRD0004\nnot really\n", b"\x00" * 300])
def test_corrupt_sitk_files_raise_input_error(tmp_path, content):
    path = tmp_path / "bad.nrrd"
    path.write_bytes(content)
    with pytest.raises(InputError, match="bad.nrrd"):
        read_volume(path)
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "missing.mha")


def write_dicom_series(
    folder: Path,
    array_zyx: np.ndarray,
    *,
    series_uid: str = "1.2.826.0.1.3680043.2.1125.1",
    spacing=(0.75, 0.75, 3.0),
    origin=(-100.0, -120.0, 40.0),
) -> None:
    """A CT series, one file per slice, written with SimpleITK's GDCM writer (the slices' own
    position and orientation tags give the geometry back). GDCM's writer sets the process locale
    to "C" (Python's default file encoding then turns ASCII): it is restored afterwards."""
    before = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_slices(folder, array_zyx, series_uid, spacing, origin)
    finally:
        locale.setlocale(locale.LC_ALL, before)


def _write_dicom_slices(folder: Path, array_zyx: np.ndarray, series_uid: str, spacing, origin) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array_zyx.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    now = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    direction = image.GetDirection()
    orientation = "\\".join(
        str(v) for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])
    )
    for z in range(image.GetDepth()):
        piece = image[:, :, z]
        position = image.TransformIndexToPhysicalPoint((0, 0, z))
        for tag, value in (
            ("0008|0031", now[1]),
            ("0008|0021", now[0]),
            ("0008|0060", "CT"),
            ("0020|000e", series_uid),
            ("0020|000d", series_uid + ".0"),
            ("0020|0037", orientation),
            ("0020|0032", "\\".join(map(str, position))),
            ("0020|0013", str(z + 1)),
            ("0018|0050", str(spacing[2])),
            ("0028|0030", f"{spacing[1]}\\{spacing[0]}"),
        ):
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(piece)


def test_dicom_series_folder_reads_and_writes_nifti(tmp_path):
    rng = np.random.default_rng(3)
    array = rng.integers(-1000, 1000, size=(6, 8, 10)).astype(np.int16)
    series = tmp_path / "archive" / "patient1"
    write_dicom_series(series, array)
    (tmp_path / "archive" / "notes").mkdir()  # a plain folder is not an input
    found = list_inputs(tmp_path / "archive")
    assert found == [series]
    assert list_inputs(series) == [series] and input_root(series) == series.parent
    assert case_id(series, tmp_path / "archive") == "patient1"
    got, meta = read_volume(series)
    np.testing.assert_array_equal(got, array)
    assert meta.fmt == "dicom"
    np.testing.assert_allclose(meta.spacing, (3.0, 0.75, 0.75), atol=1e-6)
    np.testing.assert_allclose(meta.origin, (-100.0, -120.0, 40.0), atol=1e-4)
    suffix = format_for(series).output_suffix
    assert suffix == ".nii.gz"
    out = write_labels(tmp_path / f"patient1{suffix}", (array > 0).astype(np.uint8), meta)
    back = sitk.ReadImage(str(out))  # ITK reads the NIfTI onto the series' own grid
    reference = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    assert_same_grid(back, reference)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array > 0)


def test_folder_with_two_series_is_refused(tmp_path):
    array = np.zeros((3, 4, 5), np.int16)
    write_dicom_series(tmp_path / "mixed", array, series_uid="1.2.3.4")
    write_dicom_series(tmp_path / "other", array + 1, series_uid="1.2.3.5")
    for item in (tmp_path / "other").iterdir():
        item.rename(tmp_path / "mixed" / f"b_{item.name}")
    with pytest.raises(InputError, match="2 DICOM series"):
        read_volume(tmp_path / "mixed")


def test_series_folder_with_a_fifo_is_refused_without_blocking(tmp_path):
    """GDCM opens every file of the folder; a FIFO among them would block the run forever."""
    series = tmp_path / "series"
    write_dicom_series(series, np.zeros((3, 4, 5), np.int16))
    os.mkfifo(series / "zz_pipe")
    with pytest.raises(InputError, match="not a regular file"):
        read_volume(series)


def test_nifti_spacing_comes_from_pixdim(tmp_path):
    nib = pytest.importorskip("nibabel")
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), affine), tmp_path / "a.nii.gz")
    _, meta = read_volume(tmp_path / "a.nii.gz")
    assert meta.spacing == pytest.approx((2.5, 0.8, 0.7))
    itk = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    np.testing.assert_allclose(meta.spacing, itk.GetSpacing()[::-1])
    np.testing.assert_allclose(meta.origin, itk.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(meta.direction.ravel(), itk.GetDirection(), atol=1e-6)


def test_real_scans_geometry_matches_simpleitk(real_data):
    for path in sorted(real_data.glob("*/image.nii.gz")):
        _, meta = read_volume(path)
        itk = sitk.ReadImage(str(path))
        np.testing.assert_allclose(meta.spacing, itk.GetSpacing()[::-1], rtol=1e-5, err_msg=str(path))
        np.testing.assert_allclose(meta.origin, itk.GetOrigin(), atol=1e-3, err_msg=str(path))
        np.testing.assert_allclose(meta.direction.ravel(), itk.GetDirection(), atol=1e-4, err_msg=str(path))


@pytest.mark.parametrize("damage", ["missing", "duplicate"])
def test_dicom_series_with_a_gap_or_duplicate_is_refused(tmp_path, damage):
    series = tmp_path / "series"
    write_dicom_series(series, np.arange(6 * 4 * 5, dtype=np.int16).reshape(6, 4, 5))
    if damage == "missing":
        (series / "slice003.dcm").unlink()
    else:
        shutil.copy(series / "slice002.dcm", series / "slice002b.dcm")
    with pytest.raises(InputError, match="not evenly spaced|not part of the series"):
        read_volume(series)


def test_dicom_series_with_a_truncated_slice_is_refused(tmp_path):
    series = tmp_path / "series"
    write_dicom_series(series, np.arange(6 * 4 * 5, dtype=np.int16).reshape(6, 4, 5))
    data = (series / "slice003.dcm").read_bytes()
    (series / "slice003.dcm").write_bytes(data[: len(data) - 30])
    with pytest.raises(InputError, match=r"series"):
        read_volume(series)


def test_a_series_folder_whose_first_files_are_not_dicom_is_found(tmp_path):
    from atso_fast.io import is_dicom_folder

    series = tmp_path / "series"
    write_dicom_series(series, np.zeros((3, 4, 5), np.int16))
    for i in range(10):
        (series / f"a{i:02d}_readme.txt").write_text("not dicom")
    assert is_dicom_folder(series)
    assert read_volume(series)[0].shape == (3, 4, 5)
