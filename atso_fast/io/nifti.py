"""NIfTI-1/2 (``.nii``, ``.nii.gz``) through nibabel headers and ISA-L gzip.

NIfTI stores ``(X, Y, Z[, M])`` in Fortran order, so the on-disk bytes of a NIfTI volume *are* a
C-ordered ``(Z, Y, X)`` array: reading is a zero-copy view of the decompressed buffer and writing
needs no transpose copy. gzip goes through ``isal`` (ISA-L): about 2x faster than zlib to
decompress, and an order of magnitude faster to compress label maps at a fast level, into a file
no larger than nibabel's.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from isal import igzip, isal_zlib

from atso_fast.io.base import NUMERIC_KINDS, InputError, VolumeMeta
from atso_fast.io.files import open_regular
from atso_fast.io.limits import DECODE_SHARE, check_bytes
from atso_fast.io.registry import ImageFormat, affine_geometry, register_format

__all__ = ["GZIP_LEVEL", "NiftiFormat"]

GZIP_LEVEL = 1
"""isal gzip level for written ``.nii.gz`` (0-3; 1 is fast and compresses label maps well)."""

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI_KINDS = {348: ("n+1\x00", "NIfTI-1"), 540: ("n+2\x00", "NIfTI-2")}


class NiftiFormat(ImageFormat):
    """NIfTI-1 and NIfTI-2, gzipped or not (sniffed from the bytes, whatever the suffix says).

    ``(X, Y, Z)`` becomes ``(Z, Y, X)``, ``(X, Y, Z, M)`` becomes ``(M, Z, Y, X)`` and ``(X, Y)``
    becomes ``(1, Y, X)``. ``scl_slope``/``scl_inter`` scaling, when set, gives float32/float64 like
    nibabel; big-endian data is byte-swapped to native order. Label maps are written with the
    input's affine and a copy of its header (data type set to the label dtype, scaling reset,
    ``cal_min``/``cal_max`` and intent cleared, qform/sform codes and units kept).
    """

    name = "nifti"
    suffixes = (".nii.gz", ".nii")
    reversed_axes = True

    def read(self, path: Path) -> tuple[np.ndarray, np.ndarray, Any, tuple[int, ...]]:
        return _decode_nifti(_read_nifti_bytes(path), path)

    def geometry(self, affine: np.ndarray, header: Any, shape: tuple[int, ...]) -> tuple:
        """Spacing from ``pixdim`` (as ITK and nnU-Net's readers take it), origin and direction
        from the best affine."""
        _, origin, direction = affine_geometry(affine)
        zooms = [float(z) for z in header.get_zooms()[: min(len(shape), 3)]]
        if len(zooms) < 3:
            zooms += [1.0] * (3 - len(zooms))
        return tuple(zooms[::-1]), origin, direction

    def encode(self, path: Path, array: np.ndarray, meta: VolumeMeta, key: str) -> list[Any] | bytes:
        head, data = _nifti_parts(array, meta, array.dtype)
        chunks: list[Any] = [head, data.reshape(-1).view(np.uint8)]
        return _gzip(chunks) if path.name.lower().endswith(".gz") else chunks


register_format(NiftiFormat())


_HEADER_PEEK = 544
"""Bytes enough for a NIfTI-1 (348) or NIfTI-2 (540) header and the extension flag."""
_TRAILING = 1 << 20
"""Decompressed bytes tolerated past the data (padding); more is refused, never inflated."""


def _read_nifti_bytes(path: Path) -> bytes:
    """The bytes of ``path`` up to the end of its image data, decompressed, read through a
    descriptor that never blocks (a FIFO is refused), with the header's decoded size checked
    against the memory budget before the data are read: a 2 MB gzip bomb or an 8 GiB sparse
    tail costs nothing."""
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb", closefd=False) as handle:
            gz = handle.read(2) == _GZIP_MAGIC
            handle.seek(0)
            if not gz:
                return _bounded_read(handle, path, check_trailing=False)
            with igzip.IGzipFile(fileobj=handle, mode="rb") as stream:
                return _bounded_read(stream, path, check_trailing=True)
    except InputError:
        raise
    # BadGzipFile is an OSError; isal's stub declares `error: Exception` (an instance), at run time a class
    except (EOFError, OSError, isal_zlib.error) as exc:  # type: ignore[misc]
        raise InputError(f"{path}: truncated or corrupt gzip data ({exc})") from None
    finally:
        os.close(fd)


def _bounded_read(stream: Any, path: Path, *, check_trailing: bool) -> bytes:
    head = stream.read(_HEADER_PEEK)
    end = _data_end(head, path)
    data = head[:end] if end <= len(head) else head + stream.read(end - len(head))
    # reading on to the end of the gzip stream checks its CRC; a stream that goes on is a bomb
    if check_trailing and len(stream.read(_TRAILING)) >= _TRAILING:
        raise InputError(f"{path}: gzip data go on past the image's {end} bytes; refused")
    return data


def _data_end(head: bytes, path: Path) -> int:
    """Offset just past the image data the header declares (or ``len(head)`` when ``head`` is not
    a header the budget check can read: the decoder then names the problem)."""
    import nibabel as nib

    if len(head) < 348:
        return len(head)
    klass = (
        nib.Nifti2Header
        if int.from_bytes(head[:4], "little") == 540 or int.from_bytes(head[:4], "big") == 540
        else nib.Nifti1Header
    )
    try:
        header = klass.from_fileobj(io.BytesIO(head[: klass.sizeof_hdr]), check=False)
        shape = [int(n) for n in header.get_data_shape()]
        end = max(int(header.get_data_offset()), klass.sizeof_hdr)  # a pair's header says offset 0
        end += math.prod(shape) * header.get_data_dtype().itemsize
        ndim = int(header["dim"][0])
        zooms = [float(z) for z in header["pixdim"][1 : 1 + min(max(ndim, 0), 3)]]
    except Exception:  # not a NIfTI header: _decode_nifti says so
        return len(head)
    _check_zooms(zooms, path)
    if min(shape, default=0) < 0:
        return len(head)  # _decode_nifti names the invalid shape
    check_bytes(path, end, "the decoded image", share=DECODE_SHARE)
    return end


def _decode_nifti(raw: bytes, path: Path) -> tuple[np.ndarray, np.ndarray, Any, tuple[int, ...]]:
    """Decode NIfTI bytes into a ``(Z, Y, X[, ...])`` view (C order), affine, header, stored shape."""
    if not raw:
        raise InputError(f"{path}: empty file")
    img = _nifti_image(raw, path)
    proxy = img.dataobj
    shape = tuple(int(n) for n in proxy.shape)
    if len(shape) > 4:  # NIfTI vector data is (X, Y, Z, 1, M): drop singleton axes past Z
        shape = shape[:3] + tuple(n for n in shape[3:] if n != 1)
    if len(shape) not in (2, 3, 4):
        raise InputError(f"{path}: expected 2D, 3D or 4D NIfTI data, got shape {proxy.shape}")
    dtype = np.dtype(proxy.dtype)
    if dtype.kind not in NUMERIC_KINDS:
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


def _check_zooms(zooms: list[float], path: Path) -> None:
    """Refuse zero or non-finite voxel sizes as stored (read with ``check=False``: nibabel would
    quietly set a zero to 1 mm, and a wrong size resamples the scan wrongly); a negative size is
    taken as its magnitude, as nibabel and ITK take it."""
    if not all(math.isfinite(z) and z != 0 for z in zooms):
        raise InputError(
            f"{path}: invalid voxel size {tuple(zooms)} mm (x, y, z) in the header: every size must "
            "be finite and non-zero"
        )


def _scaled(array: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """Native-order copy of ``array``; apply NIfTI scaling when it is not the identity."""
    native = array.dtype.newbyteorder("=")
    if slope is None or inter is None or (slope == 1 and inter == 0) or not np.isfinite(slope):
        return array.astype(native)  # always a writable copy of the read-only buffer view
    out = array.astype(np.result_type(native, np.float32))
    out *= slope
    out += inter
    return out


def _gzip(chunks: Sequence[Any]) -> bytes:
    """One gzip member of ``chunks`` at :data:`GZIP_LEVEL` (mtime 0: reproducible bytes)."""
    compressor = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, 31)
    return b"".join([*(compressor.compress(c) for c in chunks), compressor.flush()])


def _nifti_parts(array: np.ndarray, meta: VolumeMeta, dtype: np.dtype) -> tuple[bytes, np.ndarray]:
    """NIfTI header bytes (padded to ``vox_offset``) and the data, for a ``(Z, Y, X)`` map.

    nibabel builds the header (affine, codes, extensions, NIfTI-1/2, byte order) exactly as its
    own writer would; the data skips nibabel's copy: the C-ordered ``(Z, Y, X)`` array already
    holds the Fortran-ordered ``(X, Y, Z)`` bytes NIfTI wants.
    """
    import nibabel as nib

    data_xyz = (array[0] if meta.ndim == 2 else array).T  # F-contiguous view, no copy
    # another format's header (a DICOM series' geometry) cannot be copied: the affine carries the grid
    source = meta.header if isinstance(meta.header, nib.Nifti1Header) else None
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
