"""What every image format shares: the error type, the metadata kept with a volume, checks.

Axis convention (``atso_fast/CONTRACTS.md``): arrays are ``(Z, Y, X)`` or ``(M, Z, Y, X)``
(``M`` = channels), C-contiguous; 2D images are ``(1, Y, X)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["InputError", "VolumeMeta", "NUMERIC_KINDS", "check_array", "has_nonfinite", "os_error"]

NUMERIC_KINDS = "biuf"


class InputError(ValueError):
    """An input file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, eq=False)
class VolumeMeta:
    """What a reader learnt about a file, enough to write outputs on the same grid.

    Attributes:
        path: the file that was read.
        fmt: the name of its format in the registry (``"nifti"``, ``"npy"``, ``"npz"``, ...).
        affine: ``(4, 4)`` voxel-to-world matrix (NIfTI best affine; identity for npy/npz).
        header: the format's own header object (a copy; the nibabel header for NIfTI), or ``None``.
        shape: data shape as stored in the file (NIfTI order ``(X, Y, Z[, M])`` for NIfTI, the
            array's own shape for npy/npz), before any transpose or added depth axis.
        ndim: ``len(shape)`` (2, 3 or 4 after NIfTI singleton squeezing).
        dtype: data dtype as returned by :func:`~atso_fast.io.read_volume` (native byte order).
        spatial_shape: ``(Z, Y, X)`` of the returned array: the shape label maps must have.
        spacing: voxel size in mm along the returned array's ``(Z, Y, X)`` axes (NIfTI ``pixdim``,
            SimpleITK ``GetSpacing()`` reversed), or ``None`` when the format has none (npy/npz).
        origin: world position (mm, ITK/LPS convention) of voxel ``(0, 0, 0)``, ``(x, y, z)``.
        direction: ``(3, 3)`` ITK direction matrix (LPS; column ``i`` is the world direction of
            stored index axis ``i``, i.e. of array axis ``X``, ``Y``, ``Z`` for ``i = 0, 1, 2``).
    """

    path: Path
    fmt: str
    affine: np.ndarray
    header: Any
    shape: tuple[int, ...]
    ndim: int
    dtype: np.dtype
    spatial_shape: tuple[int, int, int]
    spacing: tuple[float, float, float] | None = None
    origin: tuple[float, float, float] | None = None
    direction: np.ndarray | None = None


def has_nonfinite(array: np.ndarray) -> bool:
    """Return whether ``array`` holds any NaN or infinity (always ``False`` for integer dtypes).

    Uses ``min``/``max`` reductions (NaN propagates), so no temporary mask is allocated.
    """
    array = np.asarray(array)
    if array.dtype.kind not in "fc" or array.size == 0:
        return False
    return not (np.isfinite(array.min()) and np.isfinite(array.max()))


def os_error(path: Path, exc: OSError) -> InputError:
    """The :class:`InputError` for an OS error met while opening or reading ``path``."""
    if isinstance(exc, IsADirectoryError):
        return InputError(f"{path}: is a directory, not an image file")
    if isinstance(exc, PermissionError):
        return InputError(f"{path}: permission denied")
    if isinstance(exc, FileNotFoundError):
        return InputError(f"{path}: no such file")
    return InputError(f"{path}: cannot read file ({exc.strerror or exc})")


def check_array(array: np.ndarray, path: Path) -> None:
    """Raise :class:`InputError` for a non-numeric or empty array read from ``path``."""
    if array.dtype.kind not in NUMERIC_KINDS:
        raise InputError(f"{path}: non-numeric data type {array.dtype}")
    if array.size == 0:
        raise InputError(f"{path}: zero-size image, shape {array.shape}")
