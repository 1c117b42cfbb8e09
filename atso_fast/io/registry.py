"""The registry of image formats: one small class per format (nnU-Net's ``BaseReaderWriter`` idea).

A format names its suffixes, reads a file into an array (in its stored layout) with its affine and
header, reports the grid's geometry (spacing, origin, direction) and encodes a label or confidence
map on the grid of a volume it read. ``read_volume`` and ``write_labels`` / ``write_confidence`` pick
the format by suffix (a folder: the format that reads folders, DICOM series); a new format is one
class and one ``register_format`` call, with no suffix if-chains elsewhere.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from atso_fast.io.atomic import atomic_write_bytes
from atso_fast.io.base import InputError, VolumeMeta, check_array

__all__ = [
    "ImageFormat",
    "register_format",
    "formats",
    "format_for",
    "image_suffix",
    "volume_format",
    "supported_suffixes",
    "read_volume",
    "write_labels",
    "write_confidence",
    "affine_geometry",
    "folder_format",
]

_LPS = np.diag([-1.0, -1.0, 1.0])
"""RAS (NIfTI, nibabel) <-> LPS (ITK, DICOM) world axes: flip x and y."""


def affine_geometry(affine: np.ndarray) -> tuple[tuple[float, float, float], tuple[float, float, float], np.ndarray]:
    """``(spacing (z, y, x), origin (x, y, z) LPS, direction (3, 3) LPS)`` of a RAS voxel-to-world
    affine whose columns are the stored index axes ``(x, y, z)``."""
    affine = np.asarray(affine, dtype=np.float64)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    zooms = np.where(zooms > 0, zooms, 1.0)
    direction = _LPS @ (affine[:3, :3] / zooms)
    origin = _LPS @ affine[:3, 3]
    sz, sy, sx = (float(z) for z in zooms[::-1])
    ox, oy, oz = (float(o) for o in origin)
    return (sz, sy, sx), (ox, oy, oz), direction


class ImageFormat(ABC):
    """One image format.

    Attributes:
        name: registry key, also ``VolumeMeta.fmt``.
        suffixes: lower-case file name endings, the longest first (``(".nii.gz", ".nii")``).
        output_suffix: ending of label maps written for an input of this format (default the
            first suffix).
        reversed_axes: the stored array is ``(X, Y, Z[, M])`` (NIfTI) and is returned reversed.
        reads_folders: inputs of this format are folders (a DICOM series), not files.
    """

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]
    reversed_axes: ClassVar[bool] = False
    reads_folders: ClassVar[bool] = False

    @property
    def output_suffix(self) -> str:
        return self.suffixes[0]

    @abstractmethod
    def read(self, path: Path) -> tuple[np.ndarray, np.ndarray, Any, tuple[int, ...]]:
        """``(array in stored layout, affine (4, 4), header or None, stored shape)``.

        Raises:
            InputError: the file cannot be read or is not a valid image of this format.
        """

    @abstractmethod
    def encode(self, path: Path, array: np.ndarray, meta: VolumeMeta, key: str) -> bytes | list[Any]:
        """Bytes (or chunks) of ``path`` holding ``array`` ``(Z, Y, X)`` of its final dtype, on
        ``meta``'s grid; ``key`` is ``"labels"`` or ``"confidence"``."""

    def geometry(
        self, affine: np.ndarray, header: Any, shape: tuple[int, ...]
    ) -> tuple[tuple[float, float, float] | None, tuple[float, float, float] | None, np.ndarray | None]:
        """``(spacing (z, y, x) mm, origin (x, y, z), direction (3, 3))`` of a file this format read
        (see :class:`~atso_fast.io.base.VolumeMeta`); by default derived from the RAS ``affine``."""
        return affine_geometry(affine)

    def write(self, path: Path, array: np.ndarray, meta: VolumeMeta, key: str) -> Path:
        """Write ``array`` to ``path`` atomically (formats whose output is more than one file
        override this)."""
        return atomic_write_bytes(path, self.encode(path, array, meta, key))


_REGISTRY: dict[str, ImageFormat] = {}


def register_format(fmt: ImageFormat) -> ImageFormat:
    """Add ``fmt`` (replacing a format of the same name); returns it."""
    _REGISTRY[fmt.name] = fmt
    return fmt


def formats() -> list[ImageFormat]:
    """The registered formats, in registration order."""
    return list(_REGISTRY.values())


def supported_suffixes() -> tuple[str, ...]:
    """Every suffix a registered format reads."""
    return tuple(s for fmt in _REGISTRY.values() for s in fmt.suffixes)


def _match(name: str) -> tuple[ImageFormat, str] | None:
    name = name.lower()
    hits = [(fmt, s) for fmt in _REGISTRY.values() for s in fmt.suffixes if name.endswith(s)]
    return max(hits, key=lambda hit: len(hit[1])) if hits else None  # ".nii.gz" beats ".gz"


def image_suffix(path: str | os.PathLike[str]) -> str | None:
    """Return the supported image suffix of ``path`` (lower case, e.g. ``".nii.gz"``) or ``None``."""
    hit = _match(os.fspath(path))
    return hit[1] if hit else None


def folder_format() -> ImageFormat | None:
    """The registered format whose inputs are folders (DICOM series), if any."""
    return next((fmt for fmt in _REGISTRY.values() if fmt.reads_folders), None)


def format_for(path: str | os.PathLike[str]) -> ImageFormat:
    """The format that reads ``path`` (a folder: the format that reads folders).

    Raises:
        InputError: no registered format has ``path``'s suffix.
    """
    if os.path.isdir(path):
        fmt = folder_format()
        if fmt is None:
            raise InputError(f"{path}: is a directory, not an image file")
        return fmt
    hit = _match(os.fspath(path))
    if hit is None:
        raise InputError(f"{path}: unsupported suffix (expected one of {', '.join(supported_suffixes())})")
    return hit[0]


def volume_format(path: str | os.PathLike[str]) -> str:
    """Return the format name (``"nifti"``, ``"npy"``, ``"npz"``, ...) for ``path``.

    Raises:
        InputError: the suffix is not one a registered format reads.
    """
    return format_for(path).name


def read_volume(path: str | os.PathLike[str]) -> tuple[np.ndarray, VolumeMeta]:
    """Read one image as a C-contiguous ``(Z, Y, X)`` or ``(M, Z, Y, X)`` array.

    The format is chosen by suffix (see each format class for its layout rules); 2D images become
    ``(1, Y, X)``. The native dtype is kept; NaN/inf values are returned as they are (see
    :func:`~atso_fast.io.base.has_nonfinite`).

    Returns:
        ``(array, meta)``.

    Raises:
        InputError: unsupported suffix, unreadable file (missing, permission denied, a folder),
            corrupt or truncated data, not an image, 1D or >4D data, zero voxels, non-numeric dtype,
            a voxel size that is zero, negative or not finite.
    """
    path = Path(path)
    fmt = format_for(path)
    array, affine, header, shape = fmt.read(path)
    if len(shape) not in (2, 3, 4):
        raise InputError(f"{path}: expected a 2D, 3D or 4D image, got shape {shape}")
    check_array(array, path)
    out_shape = tuple(reversed(shape)) if fmt.reversed_axes else tuple(shape)
    out_shape = (1, *out_shape) if len(out_shape) == 2 else out_shape
    array = np.ascontiguousarray(array.reshape(out_shape))
    affine = np.asarray(affine, dtype=np.float64)
    spacing, origin, direction = fmt.geometry(affine, header, tuple(shape))
    if spacing is not None and not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(
            f"{path}: invalid voxel size {tuple(spacing)[::-1]} mm (x, y, z) in the header: every "
            "size must be finite and positive"
        )
    z, y, x = (int(n) for n in out_shape[-3:])  # out_shape has 3 or 4 axes here
    meta = VolumeMeta(
        path, fmt.name, affine, header, shape, len(shape), array.dtype, (z, y, x), spacing, origin, direction
    )
    return array, meta


def write_labels(
    path: str | os.PathLike[str], labels: np.ndarray, meta: VolumeMeta, *, dtype: np.dtype | str | None = None
) -> Path:
    """Write a ``(Z, Y, X)`` label map on the grid of the input described by ``meta``.

    The format follows ``path``'s suffix (the registered format's ``encode``: NIfTI keeps the
    input's affine and header, ``.npz`` stores key ``"labels"``); a 2D input gets a 2D output
    back. Written atomically.

    Args:
        path: output file; must not be the input file.
        labels: ``(Z, Y, X)`` integer array equal to ``meta.spatial_shape``.
        meta: the :class:`VolumeMeta` of the input.
        dtype: stored dtype; default the labels' own when uint8 or uint16 (the engine picks it
            from the package's classes, so every case of a run has the same one), else uint8, or
            uint16 when a label exceeds 255.

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
        raise ValueError(f"{name} must have shape {meta.spatial_shape} (Z, Y, X) for {meta.path}, got {array.shape}")
    if array.dtype.kind not in "biu":
        raise ValueError(f"{name} must be an integer array, got {array.dtype}")
    return array


def _label_dtype(labels: np.ndarray, dtype: np.dtype | str | None) -> np.dtype:
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype.kind not in "iu":
            raise ValueError(f"label dtype must be an integer type, got {dtype}")
        return dtype
    if labels.dtype == np.bool_:
        return np.dtype(np.uint8)
    if labels.dtype in (np.uint8, np.uint16):  # the engine's dtype follows the package, not the case
        return labels.dtype
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lo < 0 or hi > np.iinfo(np.uint16).max:
        raise ValueError(f"labels must lie in [0, 65535], got range [{lo}, {hi}]")
    return np.dtype(np.uint8 if hi <= 255 else np.uint16)


def _write_map(path: Path, array: np.ndarray, meta: VolumeMeta, dtype: np.dtype, key: str) -> Path:
    if _same_file(path, meta.path):
        raise ValueError(f"refusing to overwrite the input file {meta.path}")
    hit = _match(path.name)
    if hit is None:
        raise ValueError(f"{path}: unsupported output suffix (expected one of {', '.join(supported_suffixes())})")
    array = np.ascontiguousarray(array, dtype=dtype)
    return hit[0].write(path, array, meta, key)


def _same_file(a: Path, b: Path | None) -> bool:
    if b is None:
        return False
    return os.path.realpath(a) == os.path.realpath(b)
