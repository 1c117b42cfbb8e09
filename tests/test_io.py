"""Tests of atso_fast.io: readers, writers, names, listing, part split and manifest."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REAL_DATA as REAL  # noqa: E402
from conftest import REAL_DATA_MISSING  # noqa: E402
from isal import igzip

from atso_fast import io as aio
from atso_fast.io import (
    InputError,
    Manifest,
    atomic_write_bytes,
    case_id,
    has_nonfinite,
    list_inputs,
    output_path,
    read_volume,
    select_part,
    write_confidence,
    write_labels,
)

REAL_IMAGES = sorted(REAL.glob("*/image.nii.gz")) if REAL.is_dir() else []


def affine_for(shape_xyz: tuple[int, ...]) -> np.ndarray:
    """A non-trivial affine: anisotropic spacing, a flip and an offset."""
    return np.array([[-0.8, 0, 0, 10.0], [0, 0.9, 0, -20.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])


def save_nifti(path: Path, data_xyz: np.ndarray, klass=nib.Nifti1Image, **header_fields) -> Path:
    """Save ``data_xyz`` (NIfTI order) with a known affine, qform/sform codes and units."""
    img = klass(data_xyz, affine_for(data_xyz.shape))
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=2)
    img.header.set_xyzt_units("mm", "sec")
    for key, value in header_fields.items():
        img.header[key] = value
    nib.save(img, path)
    return path


def xyz_data(shape: tuple[int, ...], dtype=np.int16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1000, size=shape).astype(dtype)


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_read_nifti_3d_is_zyx_c_contiguous(tmp_path, suffix):
    data = xyz_data((4, 5, 6))
    path = save_nifti(tmp_path / f"a{suffix}", data)
    array, meta = read_volume(path)
    assert array.shape == (6, 5, 4) and array.flags.c_contiguous and array.flags.writeable
    assert array.dtype == np.int16
    np.testing.assert_array_equal(array, data.T)
    assert meta.fmt == "nifti" and meta.shape == (4, 5, 6) and meta.ndim == 3
    assert meta.spatial_shape == (6, 5, 4) and meta.dtype == np.int16 and meta.path == path
    np.testing.assert_allclose(meta.affine, affine_for(data.shape))


def test_read_nifti_4d_and_2d(tmp_path):
    data4 = xyz_data((4, 5, 6, 2))
    array, meta = read_volume(save_nifti(tmp_path / "m.nii.gz", data4))
    assert array.shape == (2, 6, 5, 4) and meta.ndim == 4 and meta.spatial_shape == (6, 5, 4)
    np.testing.assert_array_equal(array, data4.transpose(3, 2, 1, 0))
    data2 = xyz_data((4, 5))
    array, meta = read_volume(save_nifti(tmp_path / "s.nii.gz", data2))
    assert array.shape == (1, 5, 4) and meta.ndim == 2 and meta.spatial_shape == (1, 5, 4)
    np.testing.assert_array_equal(array[0], data2.T)


def test_read_nifti_5d_vector_singleton_is_squeezed(tmp_path):
    data = xyz_data((4, 5, 6, 1, 3))
    array, meta = read_volume(save_nifti(tmp_path / "v.nii.gz", data))
    assert array.shape == (3, 6, 5, 4) and meta.shape == (4, 5, 6, 3)
    np.testing.assert_array_equal(array, data[:, :, :, 0, :].transpose(3, 2, 1, 0))


def test_read_nifti2_and_gzip_sniffing(tmp_path):
    data = xyz_data((3, 4, 5), np.float32)
    path = save_nifti(tmp_path / "two.nii", data, klass=nib.Nifti2Image)
    array, meta = read_volume(path)
    np.testing.assert_array_equal(array, data.T)
    assert isinstance(meta.header, nib.Nifti2Header)
    mislabelled = tmp_path / "gz_named.nii"  # gzip bytes behind a .nii name still read
    mislabelled.write_bytes(igzip.compress(path.read_bytes()))
    np.testing.assert_array_equal(read_volume(mislabelled)[0], data.T)


def test_read_applies_scaling_like_nibabel(tmp_path):
    data = xyz_data((4, 5, 6))
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(2.0, -3.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, path)
    array, meta = read_volume(path)
    assert array.dtype == np.float32 and meta.dtype == np.float32
    np.testing.assert_allclose(array, nib.load(path).get_fdata().T, rtol=1e-6)


def test_read_big_endian_becomes_native(tmp_path):
    data = xyz_data((4, 5, 6)).astype(">i2")
    header = nib.Nifti1Header(endianness=">")
    header.set_data_dtype(">i2")
    path = tmp_path / "be.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4), header), path)
    array, _ = read_volume(path)
    assert array.dtype == np.dtype("int16") and array.dtype.isnative
    np.testing.assert_array_equal(array, data.T)


def test_read_numpy_formats(tmp_path):
    vol = xyz_data((3, 4, 5), np.float32)
    np.save(tmp_path / "v.npy", vol)
    array, meta = read_volume(tmp_path / "v.npy")
    np.testing.assert_array_equal(array, vol)
    assert meta.fmt == "npy" and meta.header is None and np.array_equal(meta.affine, np.eye(4))
    np.save(tmp_path / "flat.npy", vol[0])
    array, meta = read_volume(tmp_path / "flat.npy")
    assert array.shape == (1, 4, 5) and meta.ndim == 2
    np.savez(tmp_path / "keys.npz", other=vol[:1], image=vol)
    np.testing.assert_array_equal(read_volume(tmp_path / "keys.npz")[0], vol)
    np.savez(tmp_path / "data.npz", a=vol[:1], data=vol)
    np.testing.assert_array_equal(read_volume(tmp_path / "data.npz")[0], vol)
    np.savez(tmp_path / "first.npz", first=vol, second=vol[:1])
    np.testing.assert_array_equal(read_volume(tmp_path / "first.npz")[0], vol)


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, expected words in the message)."""
    good = save_nifti(tmp / "good.nii.gz", xyz_data((6, 7, 8))).read_bytes()
    raw = igzip.decompress(good)
    (tmp / "trunc.nii.gz").write_bytes(good[: len(good) // 2])
    (tmp / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(200))
    (tmp / "text.nii").write_text("hello, I am not an image\n" * 40)
    (tmp / "empty.nii.gz").write_bytes(b"")
    (tmp / "short.nii").write_bytes(raw[: len(raw) - 10])
    (tmp / "img.xyz").write_bytes(b"x")
    (tmp / "folder.nii.gz").mkdir()
    for name, arr in {
        "one_d": np.zeros(5),
        "five_d": np.zeros((1, 2, 2, 2, 2)),
        "zero": np.zeros((0, 3, 4)),
        "text": np.array([["a", "b"]]),
        "complex": np.zeros((2, 2, 2), np.complex64),
    }.items():
        np.save(tmp / f"{name}.npy", arr)
    np.save(tmp / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp / "garbage.npz").write_bytes(b"PK not really a zip")
    nib.save(nib.Nifti1Image(np.zeros((0, 4, 5), np.int16), np.eye(4)), tmp / "zero.nii.gz")
    nib.save(nib.Nifti1Pair(np.zeros((3, 4, 5), np.int16), np.eye(4)), tmp / "pair.img")
    (tmp / "pair.hdr").rename(tmp / "pair.nii")
    rgb = np.zeros((3, 4, 5), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp / "rgb.nii")
    return {
        "zero-size nifti": (tmp / "zero.nii.gz", "zero-size"),
        "nifti pair header": (tmp / "pair.nii", "not a single-file"),
        "rgb nifti": (tmp / "rgb.nii", "non-numeric"),
        "truncated gzip": (tmp / "trunc.nii.gz", "gzip"),
        "corrupt gzip": (tmp / "corrupt.nii.gz", "gzip"),
        "not an image": (tmp / "text.nii", "not a NIfTI"),
        "empty": (tmp / "empty.nii.gz", "empty"),
        "truncated data": (tmp / "short.nii", "truncated"),
        "suffix": (tmp / "img.xyz", "unsupported suffix"),
        "directory": (tmp / "folder.nii.gz", "directory"),
        "missing": (tmp / "nope.nii.gz", "no such file"),
        "1d": (tmp / "one_d.npy", "shape (5,)"),
        "5d": (tmp / "five_d.npy", "shape (1, 2, 2, 2, 2)"),
        "zero-size": (tmp / "zero.npy", "zero-size"),
        "strings": (tmp / "text.npy", "non-numeric"),
        "complex": (tmp / "complex.npy", "non-numeric"),
        "pickle": (tmp / "pickled.npy", "not a valid .npy"),
        "bad npz": (tmp / "garbage.npz", "not a valid .npz"),
    }


def test_bad_inputs_raise_input_error_naming_file_and_problem(tmp_path):
    for what, (path, words) in _bad_inputs(tmp_path).items():
        with pytest.raises(InputError) as info:
            read_volume(path)
        message = str(info.value)
        assert str(path) in message and words.lower() in message.lower(), (what, message)
        assert isinstance(info.value, ValueError)


def test_permission_denied_is_an_input_error(tmp_path, monkeypatch):
    path = save_nifti(tmp_path / "locked.nii.gz", xyz_data((3, 3, 3)))

    real_open = os.open

    def denied(name, *args, **kwargs):  # root reads any file: deny the way the kernel does for others
        if os.fspath(name) == str(path):
            raise PermissionError(13, "Permission denied", str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(InputError, match="permission denied") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_nan_is_not_an_io_error(tmp_path):
    vol = np.ones((2, 3, 4), np.float32)
    vol[1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", vol)
    array, _ = read_volume(tmp_path / "nan.npy")
    assert has_nonfinite(array)


@pytest.mark.parametrize("value,expected", [(np.nan, True), (np.inf, True), (-np.inf, True), (1e30, False)])
def test_has_nonfinite(value, expected):
    array = np.zeros((3, 4, 5), np.float32)
    array[2, 1, 0] = value
    assert has_nonfinite(array) is expected
    assert has_nonfinite(np.zeros((2, 2), np.int16)) is False
    assert has_nonfinite(np.zeros((0,), np.float32)) is False


# ----------------------------------------------------------------------------- writing
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_write_labels_nifti_keeps_grid_and_stores_raw_uint8(tmp_path, suffix):
    src = save_nifti(tmp_path / "ct.nii.gz", xyz_data((6, 7, 8)), cal_min=-1000, cal_max=1000)
    image, meta = read_volume(src)
    labels = (image > 0).astype(np.uint8) + (image > 500)
    out = write_labels(tmp_path / f"lab{suffix}", labels, meta)
    written = nib.load(out)
    assert written.shape == (6, 7, 8) and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, meta.affine)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 2
    assert written.header.get_xyzt_units() == ("mm", "sec")
    assert written.header["cal_max"] == 0 and (written.dataobj.slope, written.dataobj.inter) == (1, 0)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels.T)
    assert written.get_data_dtype() == np.uint8 and np.asanyarray(written.dataobj).dtype == np.uint8
    assert (out.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".nii.gz")


def _nibabel_reference_bytes(labels: np.ndarray, meta: aio.VolumeMeta) -> bytes:
    """What nibabel itself writes for the same label map and prepared header."""
    header = meta.header.copy()
    header.set_data_dtype(labels.dtype)
    header["cal_min"], header["cal_max"] = 0, 0
    header.set_intent("none")
    header.set_slope_inter(None, None)
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    data = labels[0] if meta.ndim == 2 else labels
    return klass(np.asarray(data.T), meta.affine, header).to_bytes()


def _variant_inputs(tmp: Path) -> list[Path]:
    big = nib.Nifti1Header(endianness=">")
    big.set_data_dtype(">i2")
    nib.save(nib.Nifti1Image(xyz_data((5, 6, 7)).astype(">i2"), affine_for(()), big), tmp / "be.nii")
    ext = nib.Nifti1Image(xyz_data((5, 6, 7)), affine_for(()))
    ext.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"an extension"))
    nib.save(ext, tmp / "ext.nii.gz")
    return [
        tmp / "be.nii",
        tmp / "ext.nii.gz",
        save_nifti(tmp / "plain.nii.gz", xyz_data((5, 6, 7)), cal_min=-5, cal_max=5),
        save_nifti(tmp / "two.nii", xyz_data((5, 6, 7)), klass=nib.Nifti2Image),
        save_nifti(tmp / "four.nii.gz", xyz_data((5, 6, 7, 2))),
        save_nifti(tmp / "flat.nii.gz", xyz_data((5, 6))),
    ]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_nifti_bytes_equal_what_nibabel_writes(tmp_path, dtype):
    for src in _variant_inputs(tmp_path):
        _, meta = read_volume(src)
        labels = (
            np.random.default_rng(3)
            .integers(0, 300 if dtype == np.uint16 else 9, size=meta.spatial_shape)
            .astype(dtype)
        )
        mine = write_labels(tmp_path / "out.nii", labels, meta).read_bytes()
        assert mine == _nibabel_reference_bytes(labels, meta), src.name
        gz = write_labels(tmp_path / "out.nii.gz", labels, meta).read_bytes()
        assert igzip.decompress(gz) == mine, src.name


def test_write_is_reproducible_byte_for_byte(tmp_path):
    image, meta = read_volume(save_nifti(tmp_path / "a.nii.gz", xyz_data((5, 6, 7))))
    labels = (image > 0).astype(np.uint8)
    first = write_labels(tmp_path / "one.nii.gz", labels, meta).read_bytes()
    second = write_labels(tmp_path / "two.nii.gz", labels, meta).read_bytes()
    assert first == second


def test_write_labels_dtype_choice_and_validation(tmp_path):
    image, meta = read_volume(save_nifti(tmp_path / "a.nii.gz", xyz_data((5, 6, 7))))
    big = np.full(meta.spatial_shape, 300, np.int64)
    assert nib.load(write_labels(tmp_path / "b.nii.gz", big, meta)).get_data_dtype() == np.uint16
    small = np.full(meta.spatial_shape, 7, np.int64)
    out = write_labels(tmp_path / "s.nii.gz", small, meta)
    assert nib.load(out).get_data_dtype() == np.uint8
    forced = write_labels(tmp_path / "f.nii.gz", small, meta, dtype=np.uint16)
    assert nib.load(forced).get_data_dtype() == np.uint16
    with pytest.raises(ValueError, match="shape"):
        write_labels(tmp_path / "w.nii.gz", small[:-1], meta)
    with pytest.raises(ValueError, match="range"):
        write_labels(tmp_path / "n.nii.gz", small - 10, meta)
    with pytest.raises(ValueError, match="integer"):
        write_labels(tmp_path / "f.nii.gz", small.astype(np.float32), meta)
    with pytest.raises(ValueError, match="overwrite the input"):
        write_labels(meta.path, small, meta)
    with pytest.raises(ValueError, match="suffix"):
        write_labels(tmp_path / "x.xyz", small, meta)


def test_write_4d_input_gives_3d_labels_and_nifti2_stays_nifti2(tmp_path):
    _, meta = read_volume(save_nifti(tmp_path / "m.nii.gz", xyz_data((4, 5, 6, 2))))
    labels = np.arange(np.prod(meta.spatial_shape), dtype=np.int64).reshape(meta.spatial_shape) % 3
    written = nib.load(write_labels(tmp_path / "l.nii.gz", labels, meta))
    assert written.shape == (4, 5, 6)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels.T)
    _, meta2 = read_volume(save_nifti(tmp_path / "n2.nii", xyz_data((4, 5, 6)), nib.Nifti2Image))
    out = write_labels(tmp_path / "l2.nii.gz", labels, meta2)
    assert isinstance(nib.load(out), nib.Nifti2Image)


def test_write_2d_and_numpy_outputs(tmp_path):
    _, meta = read_volume(save_nifti(tmp_path / "s.nii.gz", xyz_data((4, 5))))
    labels = np.ones((1, 5, 4), np.uint8)
    assert nib.load(write_labels(tmp_path / "l.nii.gz", labels, meta)).shape == (4, 5)
    np.save(tmp_path / "flat.npy", np.zeros((5, 4), np.float32))
    _, meta = read_volume(tmp_path / "flat.npy")
    np.testing.assert_array_equal(np.load(write_labels(tmp_path / "o.npy", labels, meta)), labels[0])
    np.savez(tmp_path / "v.npz", image=np.zeros((3, 5, 4), np.float32))
    _, meta = read_volume(tmp_path / "v.npz")
    conf = np.full((3, 5, 4), 200, np.uint8)
    with np.load(write_confidence(tmp_path / "c.npz", conf, meta)) as archive:
        np.testing.assert_array_equal(archive["confidence"], conf)
    with pytest.raises(ValueError, match="uint8"):
        write_confidence(tmp_path / "c.npz", conf.astype(np.uint16), meta)


def test_atomic_write_replaces_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, memoryview(b"new contents"))
    assert target.read_bytes() == b"new contents"

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"partial")
    assert target.read_bytes() == b"new contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert aio.is_temp_name(".out.bin.atso-12-ab12cd34.tmp") and not aio.is_temp_name("out.bin")


# ------------------------------------------------------------------------ names and lists
@pytest.mark.parametrize(
    "rel,expected",
    [
        ("case1.nii.gz", "case1"),
        ("a/b/case1.nii.gz", "a/b/case1"),
        ("c_0000.nii.gz", "c"),
        ("c_0001.nii.gz", "c_0001"),
        ("x.NII.GZ", "x"),
        ("v.npy", "v"),
        ("w.npz", "w"),
        ("d.nii", "d"),
        ("_0000.nii", "_0000"),
    ],
)
def test_case_id(tmp_path, rel, expected):
    assert case_id(tmp_path / rel, tmp_path) == expected


def test_case_id_outside_root_uses_the_name(tmp_path):
    assert case_id(tmp_path / "elsewhere" / "z_0000.nii.gz", tmp_path / "root") == "z"
    with pytest.raises(InputError, match="no case name"):
        case_id(tmp_path / ".nii.gz", tmp_path)


def test_output_path_stays_inside_and_never_hits_an_input(tmp_path):
    out = tmp_path / "out"
    assert output_path(out, "a/b/c", ".nii.gz") == out / "a" / "b" / "c.nii.gz"
    for bad in ["/etc/passwd", "../x", "a/../../x", "", "a//b", "./a", "a\\..\\b"]:
        with pytest.raises(ValueError):
            output_path(out, bad, ".nii.gz")
    with pytest.raises(ValueError, match="suffix"):
        output_path(out, "a", "/../../x")
    outside = tmp_path / "outside"
    outside.mkdir()
    out.mkdir()
    (out / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the output folder"):
        output_path(out, "link/case", ".nii.gz")
    src = tmp_path / "in" / "c.nii.gz"
    with pytest.raises(ValueError, match="overwrite an input"):
        output_path(tmp_path / "in", "c", ".nii.gz", inputs=[src])


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_list_inputs_folder(tmp_path):
    for rel in [
        "b.nii.gz",
        "a.npy",
        "c.npz",
        "d.nii",
        "notes.txt",
        ".hidden.nii.gz",
        "sub/e.nii.gz",
        ".git/f.nii.gz",
        "sub/.g.npy",
        "x.xyz",
    ]:
        _touch(tmp_path / rel)
    (tmp_path / "dir.nii.gz").mkdir()
    names = [p.relative_to(tmp_path).as_posix() for p in list_inputs(tmp_path)]
    assert names == ["a.npy", "b.nii.gz", "c.npz", "d.nii", "dir.nii.gz"]  # the folder fails as a case
    names = [p.relative_to(tmp_path).as_posix() for p in list_inputs(tmp_path, recursive=True)]
    assert names == ["a.npy", "b.nii.gz", "c.npz", "d.nii", "dir.nii.gz", "sub/e.nii.gz"]


def test_list_inputs_list_file_and_single_file(tmp_path):
    elsewhere = _touch(tmp_path / "abs" / "z.npy")
    lst = tmp_path / "lists" / "cases.lst"
    lst.parent.mkdir()
    lst.write_text(f"# header\n\nimgs/a.nii.gz\n  imgs/b.npy  \n{elsewhere}\n#x.npy\nmissing.npy\n")
    assert list_inputs(lst) == [
        lst.parent / "imgs/a.nii.gz",
        lst.parent / "imgs/b.npy",
        elsewhere,
        lst.parent / "missing.npy",
    ]
    assert list_inputs(elsewhere) == [elsewhere]
    with pytest.raises(InputError, match="no such file"):
        list_inputs(tmp_path / "nothing")
    with pytest.raises(InputError, match="neither"):
        list_inputs(_touch(tmp_path / "scan.xyz"))


@pytest.mark.parametrize("num_parts", [1, 2, 3, 7, 20])
def test_select_part_covers_every_path_once(num_parts):
    paths = [Path(f"case{i:03d}.nii.gz") for i in range(17)]
    shuffled = [paths[i] for i in np.random.default_rng(1).permutation(len(paths))]
    parts = [select_part(shuffled, num_parts, k) for k in range(num_parts)]
    flat = [p for part in parts for p in part]
    assert sorted(flat) == paths and len(flat) == len(set(flat))
    assert parts == [select_part(paths, num_parts, k) for k in range(num_parts)]
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("num_parts,part_id", [(0, 0), (2, 2), (2, -1), (1.5, 0), (True, 0), (2, "1")])
def test_select_part_validates(num_parts, part_id):
    with pytest.raises(ValueError, match="num_parts|part_id"):
        select_part([Path("a")], num_parts, part_id)


# ------------------------------------------------------------------------------ manifest
def test_manifest_rows_and_completed(tmp_path):
    manifest = Manifest(tmp_path / "manifest.jsonl")
    _touch(tmp_path / "a.nii.gz")
    manifest.append(
        {
            "case_id": "a",
            "status": "ok",
            "outputs": {"labels": "a.nii.gz"},
            "mean_confidence": np.float32(0.5),
            "label_counts": np.array([3, 4]),
        }
    )
    manifest.append({"case_id": "b", "status": "ok", "outputs": {"labels": "b.nii.gz"}})
    manifest.append({"case_id": "c", "status": "failed", "error": "boom", "mean_confidence": float("nan")})
    manifest.close()
    rows = manifest.rows()
    assert [r["case_id"] for r in rows] == ["a", "b", "c"]
    assert list(rows[0]) == list(aio.MANIFEST_FIELDS)
    assert rows[0]["label_counts"] == [3, 4] and rows[2]["mean_confidence"] is None
    assert set(manifest.completed()) == {"a"}  # b's output is missing, c failed
    manifest.append({"case_id": "a", "status": "failed", "error": "redo failed"})
    assert manifest.completed() == {}  # the last row wins
    with pytest.raises(ValueError, match="status"):
        manifest.append({"case_id": "d", "status": "maybe"})


def test_manifest_skips_a_torn_last_line_and_appends_cleanly(tmp_path):
    path = tmp_path / "manifest.jsonl"
    _touch(tmp_path / "a.npy")
    full = json.dumps({"case_id": "a", "status": "ok", "outputs": {"labels": "a.npy"}})
    path.write_text(full + "\n" + full[: len(full) // 2])
    manifest = Manifest(path)
    assert [r["case_id"] for r in manifest.rows()] == ["a"]
    _touch(tmp_path / "b.npy")
    with manifest:
        manifest.append({"case_id": "b", "status": "ok", "outputs": {"labels": "b.npy"}})
    assert set(Manifest(path).completed()) == {"a", "b"}


def test_manifest_concurrent_appends_give_whole_lines(tmp_path):
    manifest = Manifest(tmp_path / "m.jsonl")

    def work(k):
        for i in range(50):
            manifest.append({"case_id": f"t{k}-{i}", "status": "ok", "error": "x" * 500})

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    manifest.close()
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert len(lines) == 200 and len({json.loads(line)["case_id"] for line in lines}) == 200


# ----------------------------------------------------------------------------- real data
@pytest.mark.realdata
@pytest.mark.skipif(not REAL_IMAGES, reason=REAL_DATA_MISSING)
@pytest.mark.parametrize("path", REAL_IMAGES, ids=lambda p: p.parent.name)
def test_real_nifti_read_matches_nibabel_and_round_trips(tmp_path, path):
    array, meta = read_volume(path)
    reference = nib.load(path)
    np.testing.assert_array_equal(array, np.asanyarray(reference.dataobj).T)
    assert array.dtype == reference.get_data_dtype().newbyteorder("=")
    labels = (array > np.median(array)).astype(np.uint8)
    written = nib.load(write_labels(tmp_path / "labels.nii.gz", labels, meta))
    assert written.shape == reference.shape[:3]
    np.testing.assert_allclose(written.affine, reference.affine)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(reference.affine)
    for key in ("qform_code", "sform_code", "xyzt_units"):
        assert int(written.header[key]) == int(reference.header[key]), key
    np.testing.assert_allclose(written.header.get_zooms()[:3], reference.header.get_zooms()[:3])
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels.T)
