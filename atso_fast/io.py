"""Volume readers and writers, archive listing, output naming and the JSONL manifest.

Axis convention (see ``CONTRACTS.md``): every array this module returns or accepts is
``(Z, Y, X)`` or ``(M, Z, Y, X)`` (``M`` = channels), C-contiguous. NIfTI stores ``(X, Y, Z[, M])``
in Fortran order, so the on-disk bytes of a NIfTI volume *are* a C-ordered ``(Z, Y, X)`` array:
reading is a zero-copy view of the decompressed buffer and writing needs no transpose copy.

gzip goes through ``isal`` (ISA-L): about 2x faster than zlib to decompress, and an order of
magnitude faster to compress label maps at a fast level, into a file no larger than nibabel's.
Every write is atomic (temp file in the same folder, ``fsync``, ``os.replace``), so a process
killed at any point leaves either the old file or the complete new one.
"""
from __future__ import annotations

import io
import json
import math
import os
import secrets
import threading
import zipfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from isal import igzip, isal_zlib

__all__ = [
    "InputError",
    "VolumeMeta",
    "SUFFIXES",
    "LIST_SUFFIXES",
    "GZIP_LEVEL",
    "image_suffix",
    "volume_format",
    "read_volume",
    "has_nonfinite",
    "write_labels",
    "write_confidence",
    "atomic_write_bytes",
    "is_temp_name",
    "case_id",
    "output_path",
    "list_inputs",
    "input_root",
    "select_part",
    "Manifest",
    "MANIFEST_FIELDS",
]

SUFFIXES = (".nii.gz", ".nii", ".npy", ".npz")
"""Image suffixes read by :func:`read_volume` (matched case-insensitively)."""
LIST_SUFFIXES = (".txt", ".lst")
"""Suffixes of list files accepted by :func:`list_inputs`."""
GZIP_LEVEL = 1
"""isal gzip level for written ``.nii.gz`` (0-3; 1 is fast and compresses label maps well)."""

_FORMATS = {".nii.gz": "nifti", ".nii": "nifti", ".npy": "npy", ".npz": "npz"}
_NUMERIC_KINDS = "biuf"
_GZIP_MAGIC = b"\x1f\x8b"
_NPZ_KEYS = ("image", "data")
_TMP_MARK = ".atso-"
_NIFTI_KINDS = {348: ("n+1\x00", "NIfTI-1"), 540: ("n+2\x00", "NIfTI-2")}


class InputError(ValueError):
    """An input file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, eq=False)
class VolumeMeta:
    """What a reader learnt about a file, enough to write outputs on the same grid.

    Attributes:
        path: the file that was read.
        fmt: ``"nifti"``, ``"npy"`` or ``"npz"``.
        affine: ``(4, 4)`` voxel-to-world matrix (NIfTI best affine; identity for npy/npz).
        header: the nibabel header (a copy) for NIfTI inputs, else ``None``.
        shape: data shape as stored in the file (NIfTI order ``(X, Y, Z[, M])`` for NIfTI, the
            array's own shape for npy/npz), before any transpose or added depth axis.
        ndim: ``len(shape)`` (2, 3 or 4 after NIfTI singleton squeezing).
        dtype: data dtype as returned by :func:`read_volume` (native byte order).
    """

    path: Path
    fmt: str
    affine: np.ndarray
    header: Any
    shape: tuple[int, ...]
    ndim: int
    dtype: np.dtype

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """``(Z, Y, X)`` of the returned array: the shape label maps must have."""
        return _array_shape(self.fmt, self.shape)[-3:]


# ----------------------------------------------------------------------------------- reading
def image_suffix(path: str | os.PathLike[str]) -> str | None:
    """Return the supported image suffix of ``path`` (lower case, e.g. ``".nii.gz"``) or ``None``."""
    name = os.fspath(path).lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def volume_format(path: str | os.PathLike[str]) -> str:
    """Return ``"nifti"``, ``"npy"`` or ``"npz"`` for ``path``.

    Raises:
        InputError: the suffix is not one of :data:`SUFFIXES`.
    """
    suffix = image_suffix(path)
    if suffix is None:
        raise InputError(f"{path}: unsupported suffix (expected one of {', '.join(SUFFIXES)})")
    return _FORMATS[suffix]


def read_volume(path: str | os.PathLike[str]) -> tuple[np.ndarray, VolumeMeta]:
    """Read one image as a C-contiguous ``(Z, Y, X)`` or ``(M, Z, Y, X)`` array.

    NIfTI ``(X, Y, Z)`` becomes ``(Z, Y, X)``, ``(X, Y, Z, M)`` becomes ``(M, Z, Y, X)`` and
    ``(X, Y)`` becomes ``(1, Y, X)``; NIfTI-1 and NIfTI-2, gzipped or not (sniffed from the
    bytes, whatever the suffix says). npy/npz arrays are taken as already ``(Z, Y, X)`` /
    ``(M, Z, Y, X)``; 2D ``(Y, X)`` becomes ``(1, Y, X)``. npz: key ``"image"``, else ``"data"``,
    else the first array. The native dtype is kept (NIfTI ``scl_slope``/``scl_inter`` scaling, when
    set, gives float32/float64 like nibabel); big-endian data is byte-swapped to native order.
    NaN/inf values are returned as they are (see :func:`has_nonfinite`).

    Args:
        path: a ``.nii``, ``.nii.gz``, ``.npy`` or ``.npz`` file.

    Returns:
        ``(array, meta)``.

    Raises:
        InputError: unsupported suffix, unreadable file (missing, permission denied, a folder),
            corrupt or truncated gzip, not an image, 1D or >4D data, zero voxels, non-numeric dtype.
    """
    path = Path(path)
    fmt = volume_format(path)
    if fmt == "nifti":
        array, affine, header, shape = _decode_nifti(_read_bytes(path), path)
    else:
        array = _load_numpy(path, fmt)
        affine, header, shape = np.eye(4), None, tuple(array.shape)
        if array.ndim not in (2, 3, 4):
            raise InputError(f"{path}: expected a 2D, 3D or 4D array, got shape {shape}")
    _check_array(array, path)
    array = np.ascontiguousarray(array.reshape(_array_shape(fmt, shape)))
    meta = VolumeMeta(path, fmt, np.asarray(affine, dtype=np.float64), header, shape,
                      len(shape), array.dtype)
    return array, meta


def has_nonfinite(array: np.ndarray) -> bool:
    """Return whether ``array`` holds any NaN or infinity (always ``False`` for integer dtypes).

    Uses ``min``/``max`` reductions (NaN propagates), so no temporary mask is allocated.
    """
    array = np.asarray(array)
    if array.dtype.kind not in "fc" or array.size == 0:
        return False
    return not (np.isfinite(array.min()) and np.isfinite(array.max()))


def _array_shape(fmt: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Returned-array shape for a stored ``shape``: NIfTI reversed, 2D given a depth of 1."""
    out = tuple(reversed(shape)) if fmt == "nifti" else tuple(shape)
    return (1, *out) if len(out) == 2 else out


def _read_bytes(path: Path) -> bytes:
    """Whole file as bytes; OS errors become :class:`InputError` naming the file."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _os_error(path, exc) from None


def _os_error(path: Path, exc: OSError) -> InputError:
    """The :class:`InputError` for an OS error met while opening or reading ``path``."""
    if isinstance(exc, IsADirectoryError):
        return InputError(f"{path}: is a directory, not an image file")
    if isinstance(exc, PermissionError):
        return InputError(f"{path}: permission denied")
    if isinstance(exc, FileNotFoundError):
        return InputError(f"{path}: no such file")
    return InputError(f"{path}: cannot read file ({exc.strerror or exc})")


def _gunzip(raw: bytes, path: Path) -> bytes:
    try:
        return igzip.decompress(raw)
    except Exception as exc:  # isal raises EOFError, BadGzipFile, isal_zlib.error
        raise InputError(f"{path}: truncated or corrupt gzip data ({exc})") from None


def _decode_nifti(raw: bytes, path: Path) -> tuple[np.ndarray, np.ndarray, Any, tuple[int, ...]]:
    """Decode NIfTI bytes into a ``(Z, Y, X[, ...])`` view (C order), affine, header, stored shape."""
    if not raw:
        raise InputError(f"{path}: empty file")
    if raw[:2] == _GZIP_MAGIC:
        raw = _gunzip(raw, path)
    img = _nifti_image(raw, path)
    proxy = img.dataobj
    shape = tuple(int(n) for n in proxy.shape)
    if len(shape) > 4:  # NIfTI vector data is (X, Y, Z, 1, M): drop singleton axes past Z
        shape = shape[:3] + tuple(n for n in shape[3:] if n != 1)
    if len(shape) not in (2, 3, 4):
        raise InputError(f"{path}: expected 2D, 3D or 4D NIfTI data, got shape {proxy.shape}")
    dtype = np.dtype(proxy.dtype)
    if dtype.kind not in _NUMERIC_KINDS:
        raise InputError(f"{path}: non-numeric NIfTI data type {dtype}")
    count = math.prod(shape)
    end = int(proxy.offset) + count * dtype.itemsize
    if count and end > len(raw):
        raise InputError(f"{path}: truncated NIfTI data: needs {end} bytes, file holds {len(raw)}")
    view = np.frombuffer(raw, dtype=dtype, count=count, offset=int(proxy.offset))
    array = _scaled(view.reshape(shape[::-1]), proxy.slope, proxy.inter)
    return array, img.affine, img.header.copy(), shape


def _nifti_image(raw: bytes, path: Path) -> Any:
    """Build a nibabel image (header only, data stays lazy) from uncompressed NIfTI bytes."""
    import nibabel as nib

    kind = None
    if len(raw) >= 348:
        for order in ("little", "big"):
            kind = _NIFTI_KINDS.get(int.from_bytes(raw[:4], order)) or kind
    if kind is None:
        raise InputError(f"{path}: not a NIfTI image (bad header size field)")
    magic, name = kind
    where = slice(344, 348) if name == "NIfTI-1" else slice(4, 8)
    if raw[where] != magic.encode("latin-1"):
        raise InputError(f"{path}: not a single-file {name} image (magic {raw[where]!r})")
    klass = nib.Nifti1Image if name == "NIfTI-1" else nib.Nifti2Image
    try:
        return klass.from_bytes(raw)
    except Exception as exc:  # nibabel raises HeaderDataError, ValueError, struct errors ...
        raise InputError(f"{path}: invalid {name} header ({exc})") from None


def _scaled(array: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """Native-order copy of ``array``; apply NIfTI scaling when it is not the identity."""
    native = array.dtype.newbyteorder("=")
    if slope is None or inter is None or (slope == 1 and inter == 0) or not np.isfinite(slope):
        return array.astype(native)  # always a writable copy of the read-only buffer view
    out = array.astype(np.result_type(native, np.float32))
    out *= slope
    out += inter
    return out


def _load_numpy(path: Path, fmt: str) -> np.ndarray:
    """Load a ``.npy`` array or the image array of a ``.npz`` archive (no pickles)."""
    try:
        if fmt == "npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise InputError(f"{path}: not a .npz archive")
            keys = list(archive.files)
            if not keys:
                raise InputError(f"{path}: .npz archive holds no arrays")
            key = next((k for k in _NPZ_KEYS if k in keys), keys[0])
            return archive[key]
    except InputError:
        raise
    except (IsADirectoryError, PermissionError, FileNotFoundError) as exc:
        raise _os_error(path, exc) from None
    except Exception as exc:  # ValueError (bad magic, pickles), EOFError, BadZipFile, OSError
        raise InputError(f"{path}: not a valid .{fmt} file ({exc})") from None


def _check_array(array: np.ndarray, path: Path) -> None:
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise InputError(f"{path}: non-numeric data type {array.dtype}")
    if array.size == 0:
        raise InputError(f"{path}: zero-size image, shape {array.shape}")


# ----------------------------------------------------------------------------------- writing
def atomic_write_bytes(path: str | os.PathLike[str],
                       data: bytes | bytearray | memoryview | Sequence[Any]) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    A reader (or a resumed run) sees either the previous file or the complete new one; the
    temp file is hidden (``.NAME.atso-PID-TOKEN.tmp``) and removed if the write fails.

    Args:
        path: destination file (its folder must exist).
        data: a bytes-like object, or a list/tuple of them written one after the other.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    chunks = data if isinstance(data, (list, tuple)) else [data]
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temp file left by :func:`atomic_write_bytes` (e.g. after a kill)."""
    return name.startswith(".") and _TMP_MARK in name and name.endswith(".tmp")


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_labels(path: str | os.PathLike[str], labels: np.ndarray, meta: VolumeMeta, *,
                 dtype: np.dtype | str | None = None) -> Path:
    """Write a ``(Z, Y, X)`` label map on the grid of the input described by ``meta``.

    The format follows ``path``'s suffix: ``.nii.gz`` / ``.nii`` (the input's affine and a copy of
    its header with the data type set to the label dtype, ``scl_slope``/``scl_inter`` reset so
    values are stored raw, ``cal_min``/``cal_max`` and intent cleared, qform/sform codes and units
    kept; gzipped with isal at :data:`GZIP_LEVEL`), ``.npy``, or ``.npz`` (key ``"labels"``). NIfTI
    outputs are ``(X, Y, Z)``; a 2D input gets a 2D output back. Written atomically.

    Args:
        path: output file; must not be the input file.
        labels: ``(Z, Y, X)`` integer array equal to ``meta.spatial_shape``.
        meta: the :class:`VolumeMeta` of the input.
        dtype: stored dtype; default uint8, or uint16 when a label exceeds 255.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: wrong shape, non-integer or out-of-range labels, unsupported suffix, or
            ``path`` is the input file.
    """
    labels = _check_output_array(labels, meta, "labels")
    return _write_map(Path(path), labels, meta, _label_dtype(labels, dtype), "labels")


def write_confidence(path: str | os.PathLike[str], confidence: np.ndarray, meta: VolumeMeta) -> Path:
    """Write a ``(Z, Y, X)`` uint8 confidence map (max probability x 255) like :func:`write_labels`."""
    confidence = _check_output_array(confidence, meta, "confidence")
    if confidence.dtype != np.uint8:
        raise ValueError(f"confidence must be uint8, got {confidence.dtype}")
    return _write_map(Path(path), confidence, meta, np.dtype(np.uint8), "confidence")


def _check_output_array(array: np.ndarray, meta: VolumeMeta, name: str) -> np.ndarray:
    array = np.asarray(array)
    if tuple(array.shape) != tuple(meta.spatial_shape):
        raise ValueError(f"{name} must have shape {meta.spatial_shape} (Z, Y, X) for "
                         f"{meta.path}, got {array.shape}")
    if array.dtype.kind not in "biu":
        raise ValueError(f"{name} must be an integer array, got {array.dtype}")
    return array


def _label_dtype(labels: np.ndarray, dtype: np.dtype | str | None) -> np.dtype:
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype.kind not in "iu":
            raise ValueError(f"label dtype must be an integer type, got {dtype}")
        return dtype
    if labels.dtype == np.uint8 or labels.dtype == np.bool_:
        return np.dtype(np.uint8)
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lo < 0 or hi > np.iinfo(np.uint16).max:
        raise ValueError(f"labels must lie in [0, 65535], got range [{lo}, {hi}]")
    return np.dtype(np.uint8 if hi <= 255 else np.uint16)


def _write_map(path: Path, array: np.ndarray, meta: VolumeMeta, dtype: np.dtype,
               key: str) -> Path:
    if _same_file(path, meta.path):
        raise ValueError(f"refusing to overwrite the input file {meta.path}")
    suffix = image_suffix(path)
    array = np.ascontiguousarray(array, dtype=dtype)
    if suffix in (".nii.gz", ".nii"):
        head, data = _nifti_parts(array, meta, dtype)
        chunks: list[Any] = [head, data.reshape(-1).view(np.uint8)]
        return atomic_write_bytes(path, _gzip(chunks) if suffix == ".nii.gz" else chunks)
    if suffix == ".npy":
        return atomic_write_bytes(path, _npy_bytes(_restore_ndim(array, meta)))
    if suffix == ".npz":
        return atomic_write_bytes(path, _npz_bytes(_restore_ndim(array, meta), key))
    raise ValueError(f"{path}: unsupported output suffix (expected one of {', '.join(SUFFIXES)})")


def _gzip(chunks: Sequence[Any]) -> bytes:
    """One gzip member of ``chunks`` at :data:`GZIP_LEVEL` (mtime 0: reproducible bytes)."""
    compressor = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, 31)
    return b"".join([*(compressor.compress(c) for c in chunks), compressor.flush()])


def _restore_ndim(array: np.ndarray, meta: VolumeMeta) -> np.ndarray:
    """``(1, Y, X)`` back to ``(Y, X)`` for 2D inputs."""
    return array[0] if meta.ndim == 2 else array


def _nifti_parts(array: np.ndarray, meta: VolumeMeta, dtype: np.dtype) -> tuple[bytes, np.ndarray]:
    """NIfTI header bytes (padded to ``vox_offset``) and the data, for a ``(Z, Y, X)`` map.

    nibabel builds the header (affine, codes, extensions, NIfTI-1/2, byte order) exactly as its
    own writer would; the data skips nibabel's copy: the C-ordered ``(Z, Y, X)`` array already
    holds the Fortran-ordered ``(X, Y, Z)`` bytes NIfTI wants.
    """
    import nibabel as nib

    data_xyz = _restore_ndim(array, meta).T  # F-contiguous view, no copy
    source = meta.header
    klass = nib.Nifti2Image if isinstance(source, nib.Nifti2Header) else nib.Nifti1Image
    if source is not None:
        source = source.copy()
        source.set_data_dtype(dtype)
        source["cal_min"], source["cal_max"] = 0, 0
        source.set_intent("none")
    image = klass(data_xyz, meta.affine, source)
    image.update_header()
    header = image.header
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)  # values stored raw, written as nibabel writes them
    buffer = io.BytesIO()
    header.write_to(buffer)  # sets vox_offset past the extensions
    buffer.write(b"\0" * max(0, int(header.get_data_offset()) - buffer.tell()))
    data = np.ascontiguousarray(array, dtype=header.get_data_dtype())  # header byte order
    return buffer.getvalue(), data


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npz_bytes(array: np.ndarray, key: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as member:
            np.lib.format.write_array(member, array, allow_pickle=False)
    return buffer.getvalue()


def _same_file(a: Path, b: Path | None) -> bool:
    if b is None:
        return False
    return os.path.realpath(a) == os.path.realpath(b)


# ---------------------------------------------------------------------------- names and lists
def case_id(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """Case name: ``path`` relative to ``root`` without the image suffix, ``/``-separated.

    ``root/a/b/case1.nii.gz`` gives ``"a/b/case1"``; nnU-Net's ``_0000`` channel suffix is
    stripped (``case1_0000.nii.gz`` gives ``"case1"``). A path outside ``root`` gives its bare name.

    Raises:
        InputError: the name is empty once the suffix is removed.
    """
    path = Path(os.path.abspath(path))
    try:
        rel = path.relative_to(os.path.abspath(root))
    except ValueError:
        rel = Path(path.name)
    name = rel.name
    suffix = image_suffix(name)
    stem = name[: len(name) - len(suffix)] if suffix else name
    if stem.endswith("_0000") and len(stem) > 5:
        stem = stem[:-5]
    if not stem:
        raise InputError(f"{path}: file name has no case name before its suffix")
    return (rel.parent / stem).as_posix()


def output_path(output_dir: str | os.PathLike[str], case_id: str, suffix: str, *,
                inputs: Collection[str | os.PathLike[str]] = ()) -> Path:
    """``output_dir / (case_id + suffix)``, refused when it could escape or clobber an input.

    Args:
        output_dir: the output folder.
        case_id: relative ``/``-separated case name (see :func:`case_id`).
        suffix: e.g. ``".nii.gz"`` or ``"_confidence.nii.gz"``; no path separators.
        inputs: input files the result must not equal (compared after resolving links).

    Raises:
        ValueError: absolute or empty case id, ``..``/``.`` parts, a separator in ``suffix``,
            a symlink that leads outside ``output_dir``, or the result equals an input file.
    """
    if not case_id or "\x00" in case_id or "\\" in case_id or case_id.startswith("/"):
        raise ValueError(f"case id must be a relative '/'-separated name, got {case_id!r}")
    parts = case_id.split("/")
    if any(p in ("", ".", "..") for p in parts) or Path(case_id).is_absolute():
        raise ValueError(f"case id must not contain empty, '.' or '..' parts, got {case_id!r}")
    if not suffix or any(sep in suffix for sep in ("/", "\\", "\x00")):
        raise ValueError(f"output suffix must be a plain name ending, got {suffix!r}")
    base = Path(output_dir)
    out = base.joinpath(*parts[:-1], parts[-1] + suffix)
    real_out, real_base = os.path.realpath(out), os.path.realpath(base)
    if os.path.commonpath([real_out, real_base]) != real_base or real_out == real_base:
        raise ValueError(f"output {out} resolves to {real_out}, outside the output folder {base}")
    if any(real_out == os.path.realpath(p) for p in inputs):
        raise ValueError(f"output {out} would overwrite an input file")
    return out


def input_root(inputs: str | os.PathLike[str]) -> Path:
    """The folder case ids are taken relative to: the folder itself, or a file's parent."""
    inputs = Path(inputs)
    return inputs if inputs.is_dir() else inputs.parent


def list_inputs(inputs: str | os.PathLike[str], *, recursive: bool = False) -> list[Path]:
    """Image files named by ``inputs``.

    Args:
        inputs: a folder (files with a supported suffix, sorted by relative path, hidden files
            and folders skipped; sub-folders too when ``recursive``, but symlinked folders are
            not followed, so link cycles cannot loop), a list file (``.txt`` /
            ``.lst``: one path per line, relative to the list file's folder, blank lines and
            ``#`` comment lines skipped; entries are kept even if missing, so they fail per
            case), or a single image file.
        recursive: descend into sub-folders of a folder input.

    Returns:
        The paths (not resolved), in a deterministic order.

    Raises:
        InputError: ``inputs`` does not exist, cannot be read, or is neither kind.
    """
    inputs = Path(inputs)
    if inputs.is_dir():
        return _scan_folder(inputs, recursive)
    if not inputs.exists():
        raise InputError(f"{inputs}: no such file or folder")
    if inputs.suffix.lower() in LIST_SUFFIXES:
        return _read_list(inputs)
    if image_suffix(inputs) is None:
        raise InputError(f"{inputs}: neither a folder, a list file ({', '.join(LIST_SUFFIXES)}) "
                         f"nor an image ({', '.join(SUFFIXES)})")
    return [inputs]


def _scan_folder(folder: Path, recursive: bool) -> list[Path]:
    found: list[tuple[str, Path]] = []

    def fail(exc: OSError) -> None:
        raise InputError(f"{exc.filename}: cannot list folder ({exc.strerror})")

    for here, dirs, files in os.walk(folder, onerror=fail):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        rel_here = Path(here).relative_to(folder)
        for name in files:
            if not name.startswith(".") and image_suffix(name) is not None:
                found.append(((rel_here / name).as_posix(), Path(here) / name))
    return [path for _, path in sorted(found)]


def _read_list(list_file: Path) -> list[Path]:
    try:
        text = list_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{list_file}: cannot read list file ({exc})") from None
    base = list_file.parent
    lines = (line.strip() for line in text.splitlines())
    return [base / line for line in lines if line and not line.startswith("#")]


def select_part(paths: Sequence[str | os.PathLike[str]], num_parts: int, part_id: int) -> list[Path]:
    """Deterministic share ``part_id`` of ``num_parts``: round robin over the sorted paths.

    Every path lands in exactly one part, whatever order ``paths`` came in.

    Raises:
        ValueError: ``num_parts < 1`` or ``part_id`` outside ``[0, num_parts)`` (or not ints).
    """
    for name, value in (("num_parts", num_parts), ("part_id", part_id)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise ValueError(f"part_id must be in [0, {num_parts}), got {part_id}")
    ordered = sorted((Path(p) for p in paths), key=lambda p: p.as_posix())
    return ordered[part_id::num_parts]


# ----------------------------------------------------------------------------------- manifest
MANIFEST_FIELDS = ("case_id", "input", "status", "shape", "seconds", "label_counts",
                   "ignored_fraction", "mean_confidence", "outputs", "error")
"""Keys of a manifest row, in the order they are written (missing keys are written as null).

``case_id`` (see :func:`case_id`), ``input`` (path as listed), ``status`` (``"ok"``|``"failed"``),
``shape`` (``[Z, Y, X]`` of the label map), ``seconds`` (time inside ``relabel_volume``),
``label_counts`` / ``ignored_fraction`` / ``mean_confidence`` (from the engine's stats),
``outputs`` (``{"labels": path, "confidence": path}`` relative to the manifest's folder),
``error`` (one line naming the file and the problem, for failed rows). Non-finite floats are
written as null so every line is strict JSON.
"""


class Manifest:
    """Append-only JSONL record of relabelled cases, safe against ``kill -9``.

    Each :meth:`append` is one ``os.write`` of one complete line on an ``O_APPEND`` descriptor
    followed by ``fsync``, so a killed writer leaves at most one torn last line, and processes
    working on different parts of an archive can share one manifest. Reading skips lines that
    do not parse (a torn line); :meth:`append` first ends a torn last line with a newline.

    Row ``outputs`` map a name (``"labels"``, ``"confidence"``) to a path relative to the
    manifest's folder (absolute paths work too).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the append descriptor (reopened by the next :meth:`append`)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def append(self, row: Mapping[str, Any]) -> None:
        """Write ``row`` as one line (keys from :data:`MANIFEST_FIELDS`, extras kept).

        Raises:
            ValueError: no ``case_id`` or a status other than ``"ok"`` / ``"failed"``.
        """
        if not row.get("case_id") or row.get("status") not in ("ok", "failed"):
            raise ValueError(f"manifest row needs a case_id and status 'ok'|'failed', got {row!r}")
        full = {key: row.get(key) for key in MANIFEST_FIELDS}
        full.update((k, v) for k, v in row.items() if k not in full)
        line = (json.dumps(_jsonable(full), allow_nan=False) + "\n").encode("utf-8")
        with self._lock:
            fd = self._open()
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            if _ends_torn(self.path):
                os.write(fd, b"\n")
            self._fd = fd
        return self._fd

    def rows(self) -> list[dict[str, Any]]:
        """All parseable rows in file order (torn or garbled lines skipped)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        rows = []
        for line in data.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("case_id"):
                rows.append(row)
        return rows

    def latest(self) -> dict[str, dict[str, Any]]:
        """``{case_id: last row}`` (a later row supersedes an earlier one)."""
        return {row["case_id"]: row for row in self.rows()}

    def completed(self) -> dict[str, dict[str, Any]]:
        """``{case_id: row}`` for cases whose last row is ``"ok"`` and whose outputs all exist."""
        return {cid: row for cid, row in self.latest().items()
                if row.get("status") == "ok" and self._outputs_exist(row)}

    def _outputs_exist(self, row: Mapping[str, Any]) -> bool:
        outputs = row.get("outputs")
        if not isinstance(outputs, dict) or not outputs:
            return False
        return all(isinstance(p, str) and (self.path.parent / p).is_file() for p in outputs.values())


def _ends_torn(path: Path) -> bool:
    """Whether a non-empty file does not end with a newline."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return False
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"
    except OSError:
        return False


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays to Python, non-finite floats to ``None``."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value if value is None or isinstance(value, str) else str(value)
