"""NumPy ``.npy`` / ``.npz`` images (no pickles): arrays taken as already ``(Z, Y, X)``."""

from __future__ import annotations

import io
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from atso_fast.io.base import InputError, VolumeMeta
from atso_fast.io.files import open_regular
from atso_fast.io.limits import DECODE_SHARE, check_bytes
from atso_fast.io.registry import ImageFormat, register_format

__all__ = ["NpyFormat", "NpzFormat"]

_NPZ_KEYS = ("image", "data")


class NpyFormat(ImageFormat):
    """``.npy``: a ``(Z, Y, X)`` / ``(M, Z, Y, X)`` array (2D ``(Y, X)`` becomes ``(1, Y, X)``)."""

    name = "npy"
    suffixes = (".npy",)

    def read(self, path: Path) -> tuple[np.ndarray, np.ndarray, Any, tuple[int, ...]]:
        array = _load_numpy(path, self.name)
        return array, np.eye(4), None, tuple(array.shape)

    def geometry(self, affine: np.ndarray, header: Any, shape: tuple[int, ...]) -> tuple[None, None, None]:
        """A bare array has no spacing, origin or direction."""
        return None, None, None

    def encode(self, path: Path, array: np.ndarray, meta: VolumeMeta, key: str) -> bytes:
        return _npy_bytes(array[0] if meta.ndim == 2 else array)


class NpzFormat(NpyFormat):
    """``.npz``: key ``"image"``, else ``"data"``, else the first array; outputs under ``key``."""

    name = "npz"
    suffixes = (".npz",)

    def encode(self, path: Path, array: np.ndarray, meta: VolumeMeta, key: str) -> bytes:
        return _npz_bytes(array[0] if meta.ndim == 2 else array, key)


register_format(NpyFormat())
register_format(NpzFormat())


def _load_numpy(path: Path, fmt: str) -> np.ndarray:
    """Load a ``.npy`` array or the image array of a ``.npz`` archive (no pickles), through a
    descriptor that never blocks, with the header's size checked against the memory budget."""
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb", closefd=False) as handle:
            if fmt == "npy":
                return _read_npy(handle, path)
            with zipfile.ZipFile(handle) as archive:
                with archive.open(_npz_member(archive, path)) as member:
                    return _read_npy(member, path)
    except InputError:
        raise
    except Exception as exc:  # ValueError (bad magic, pickles), EOFError, BadZipFile, OSError
        raise InputError(f"{path}: not a valid .{fmt} file ({exc})") from None
    finally:
        os.close(fd)


def _npz_member(archive: zipfile.ZipFile, path: Path) -> str:
    names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
    if not names:
        raise InputError(f"{path}: .npz archive holds no arrays")
    return next((k for k in _NPZ_KEYS if k in names), names[0]) + ".npy"


def _read_npy(handle: Any, path: Path) -> np.ndarray:
    version = np.lib.format.read_magic(handle)
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = header(handle)
    if dtype.hasobject:
        raise InputError(
            f"{path}: not a valid .npy image: it holds Python objects (a pickle), which atso-fast never loads"
        )
    check_bytes(path, math.prod(shape) * dtype.itemsize, "the decoded image", share=DECODE_SHARE)
    handle.seek(0)
    return np.load(handle, allow_pickle=False)


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
