"""NRRD, MetaImage (``.mha``, ``.mhd`` + data file) and DICOM series folders, through SimpleITK.

SimpleITK's arrays are already ``(Z, Y, X)`` (x fastest, as stored), so nothing is transposed;
vector pixels (``(Z, Y, X, M)``) become channels ``(M, Z, Y, X)``. Spacing, origin and direction
are kept in the header (a plain dict) and written back unchanged with every label map, in the
input's own format; a DICOM series is written as NIfTI with the series' geometry (its RAS affine).
SimpleITK is imported when a file of these formats is first read or written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from atso_fast.io.atomic import commit_temp, temp_path
from atso_fast.io.base import InputError, VolumeMeta
from atso_fast.io.files import not_regular_error
from atso_fast.io.registry import ImageFormat, format_for, image_suffix, register_format
from atso_fast.io.sitk_headers import staged_copy

__all__ = ["DicomSeriesFormat", "MhaFormat", "MhdFormat", "NrrdFormat", "SitkFormat", "is_dicom_folder", "sitk_affine"]

_LPS = np.diag([-1.0, -1.0, 1.0])


def _sitk() -> Any:
    try:
        import SimpleITK as sitk
    except ImportError as exc:  # a dependency: only a broken install lands here
        raise InputError(f"NRRD/MetaImage/DICOM need SimpleITK (pip install SimpleITK): {exc}") from None
    return sitk


def _first_line(exc: Exception) -> str:
    """ITK's reason, without the source location, object address and 'Reason: Success' noise."""
    parts = []
    for line in str(exc).splitlines():
        line = line.strip()
        if not line or line.startswith("Exception thrown") or line == "Reason: Success":
            continue
        if "ERROR:" in line:
            line = line.split("ERROR:", 1)[1].strip()
            line = line.split("): ", 1)[1] if "): " in line else line
        parts.append(line)
    return "; ".join(parts)[:300] or type(exc).__name__


def sitk_affine(spacing, origin, direction) -> np.ndarray:
    """RAS voxel-to-world ``(4, 4)`` affine of an ITK grid (index order ``(x, y, z)``); 2D grids
    are embedded in 3D with unit spacing along z."""
    dim = len(spacing)
    k = min(dim, 3)
    d = np.eye(3)
    d[:k, :k] = np.asarray(direction, np.float64).reshape(dim, dim)[:k, :k]
    sp = np.ones(3)
    sp[:k] = np.asarray(spacing, np.float64)[:3]
    org = np.zeros(3)
    org[:k] = np.asarray(origin, np.float64)[:3]
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ d @ np.diag(sp)
    affine[:3, 3] = _LPS @ org
    return affine


def _decode(image: Any, path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any], tuple[int, ...]]:
    sitk = _sitk()
    array = sitk.GetArrayFromImage(image)  # (z, y, x) / (y, x), components last
    dim = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = np.moveaxis(array, -1, 0)
        if dim == 2:
            array = array[:, None]  # (M, 1, Y, X)
    header = {
        "spacing": tuple(image.GetSpacing()),
        "origin": tuple(image.GetOrigin()),
        "direction": tuple(image.GetDirection()),
        "dimension": dim,
        "components": image.GetNumberOfComponentsPerPixel(),
    }
    affine = sitk_affine(header["spacing"], header["origin"], header["direction"])
    return array, affine, header, tuple(int(n) for n in array.shape)


class SitkFormat(ImageFormat):
    """A single-file format SimpleITK reads and writes (``io_name``: its ITK ImageIO)."""

    io_name: ClassVar[str]

    def read(self, path: Path) -> tuple[np.ndarray, np.ndarray, Any, tuple[int, ...]]:
        """SimpleITK reads a private copy of the file and its data file, made after their header
        was checked (:mod:`atso_fast.io.sitk_headers`): it never follows a header's name."""
        sitk = _sitk()
        reader = sitk.ImageFileReader()
        reader.SetImageIO(self.io_name)
        with staged_copy(path, nrrd=self.io_name == "NrrdImageIO") as copy:
            reader.SetFileName(str(copy))
            try:
                image = reader.Execute()
            except RuntimeError as exc:
                raise InputError(f"{path}: not a readable {self.name} image ({_first_line(exc)})") from None
        return _decode(image, path)

    def geometry(self, affine: np.ndarray, header: Any, shape: tuple[int, ...]) -> tuple:
        dim = int(header["dimension"])
        spacing = list(header["spacing"][:3])[::-1]
        spacing = [1.0] * (3 - len(spacing)) + spacing
        origin = list(header["origin"][:3]) + [0.0] * (3 - min(dim, 3))
        direction = np.eye(3)
        k = min(dim, 3)
        direction[:k, :k] = np.asarray(header["direction"], np.float64).reshape(dim, dim)[:k, :k]
        return tuple(float(s) for s in spacing), tuple(float(o) for o in origin), direction

    def encode(self, path: Path, array: np.ndarray, meta: VolumeMeta, key: str) -> bytes:
        raise NotImplementedError(f"{self.name} maps are written by SimpleITK (use write)")

    def write(self, path: Path, array: np.ndarray, meta: VolumeMeta, key: str) -> Path:
        """SimpleITK writes ``path``'s name (and a MetaImage's data file) into a hidden folder beside
        ``path``; each file is then renamed into place, the data file before the header that
        names it, so a reader never sees a partial file or a header without its data."""
        sitk = _sitk()
        image = _image_on_grid(array, meta)
        work = temp_path(path, folder=True)  # a resumed run removes it after a kill (is_stale_temp)
        work.mkdir()
        try:
            writer = sitk.ImageFileWriter()
            writer.SetImageIO(self.io_name)
            writer.SetFileName(str(work / path.name))
            writer.SetUseCompression(True)
            try:
                writer.Execute(image)
            except RuntimeError as exc:
                raise OSError(f"{path}: SimpleITK could not write the {self.name} file ({_first_line(exc)})") from None
            for item in sorted(work.iterdir(), key=lambda p: p.name == path.name):  # the named file last
                commit_temp(item, path.with_name(item.name))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return path


def _image_on_grid(array: np.ndarray, meta: VolumeMeta) -> Any:
    """A SimpleITK image of ``array (Z, Y, X)`` with the geometry of the input ``meta`` describes."""
    sitk = _sitk()
    header = meta.header if isinstance(meta.header, dict) and "spacing" in meta.header else None
    two_d = (header["dimension"] == 2) if header else meta.ndim == 2
    image = sitk.GetImageFromArray(np.ascontiguousarray(array[0] if two_d else array))
    if header is not None and header["dimension"] == image.GetDimension():
        image.SetSpacing(header["spacing"])
        image.SetOrigin(header["origin"])
        image.SetDirection(header["direction"])
    elif meta.spacing is not None and not two_d:
        image.SetSpacing(tuple(float(s) for s in meta.spacing[::-1]))
        if meta.origin is not None:
            image.SetOrigin(tuple(float(o) for o in meta.origin))
        if meta.direction is not None:
            image.SetDirection(tuple(float(d) for d in np.asarray(meta.direction).ravel()))
    return image


class NrrdFormat(SitkFormat):
    """NRRD (``.nrrd``, detached ``.nhdr`` headers read too); label maps written as gzip NRRD."""

    name = "nrrd"
    suffixes = (".nrrd", ".nhdr")
    io_name = "NrrdImageIO"

    @property
    def output_suffix(self) -> str:
        return ".nrrd"


class MhaFormat(SitkFormat):
    """MetaImage in one file (``.mha``)."""

    name = "mha"
    suffixes = (".mha",)
    io_name = "MetaImageIO"


class MhdFormat(SitkFormat):
    """MetaImage header ``.mhd`` with its data file (``.raw``/``.zraw``) beside it (written data
    file first, then the header)."""

    name = "mhd"
    suffixes = (".mhd",)
    io_name = "MetaImageIO"


def is_dicom_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding DICOM files (``DICM`` at byte 128 of any of its
    files: a series folder whose first files are a README and thumbnails still counts);
    sub-folders are not looked into."""
    try:
        return next(_dicom_files(Path(path)), None) is not None
    except OSError:
        return False


def _refuse_special_files(folder: Path) -> None:
    """Refuse a series folder holding a FIFO, socket or device: GDCM opens every file it lists,
    and opening a FIFO blocks until a writer comes."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                continue
            problem = not_regular_error(entry.path)
            if problem:
                raise InputError(f"{folder}: holds a file that is not a regular file ({problem})")


_SPACING_TOLERANCE = 0.02
"""Relative spread of the distances between slices above which a series is refused (a missing
slice doubles one distance; ITK would read the series as if evenly spaced, geometry off)."""


def _dicom_files(folder: Path) -> Iterator[str]:
    """The files of ``folder`` with the DICOM magic (``DICM`` at byte 128); files named like
    another image format, hidden files and non-regular files are not opened."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or image_suffix(entry.name) or not entry.is_file():
                continue
            try:
                with open(entry.path, "rb") as handle:
                    head = handle.read(132)
            except OSError:
                continue
            if len(head) == 132 and head[128:132] == b"DICM":
                yield entry.path


def _check_series_files(folder: Path, names: Sequence[str]) -> None:
    """Every DICOM file of the folder must belong to the series GDCM assembled: a truncated or
    unreadable slice is left out by GDCM, and the volume would silently miss it."""
    left_out = sorted(set(map(os.path.realpath, _dicom_files(folder))) - set(map(os.path.realpath, names)))
    if left_out:
        raise InputError(
            f"{folder}: {len(left_out)} DICOM file(s) are not part of the series "
            "(unreadable, truncated or of another geometry: "
            f"{', '.join(Path(p).name for p in left_out[:3])}"
            f"{', ...' if len(left_out) > 3 else ''}); refused rather than read with slices missing"
        )


def _slice_positions(names: Sequence[str]) -> np.ndarray | None:
    """Each slice's position along the slice normal (mm), or None when a header lacks the tags."""
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    positions = []
    for name in names:
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
            ipp = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
            iop = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
        except (RuntimeError, ValueError):
            return None
        if len(ipp) != 3 or len(iop) != 6:
            return None
        positions.append(float(np.dot(np.cross(iop[:3], iop[3:]), ipp)))
    return np.asarray(positions)


def _check_slice_spacing(folder: Path, names: Sequence[str]) -> None:
    """Refuse a series whose slices are not evenly spaced (a gap, a duplicate): ITK reads it as
    if they were, and every label would sit at the wrong height."""
    if len(names) < 3:
        return
    positions = _slice_positions(names)
    if positions is None:
        return
    steps = np.abs(np.diff(np.sort(positions)))
    typical = float(np.median(steps))
    if typical <= 0 or float(steps.min()) < 1e-3 or float(np.ptp(steps)) > _SPACING_TOLERANCE * typical:
        raise InputError(
            f"{folder}: DICOM slices are not evenly spaced (distances {float(steps.min()):.3g} to "
            f"{float(steps.max()):.3g} mm, typical {typical:.3g}): a missing, duplicate or "
            "misplaced slice; refused rather than read with the wrong geometry"
        )


class DicomSeriesFormat(SitkFormat):
    """A folder holding one DICOM series (GDCM through SimpleITK); label maps are NIfTI on the
    series' grid (RAS affine from its spacing, origin and direction)."""

    name = "dicom"
    suffixes = ()
    reads_folders = True
    io_name = "GDCMImageIO"

    @property
    def output_suffix(self) -> str:
        return ".nii.gz"

    def read(self, path: Path) -> tuple[np.ndarray, np.ndarray, Any, tuple[int, ...]]:
        sitk = _sitk()
        if not path.is_dir():
            raise InputError(f"{path}: not a DICOM series folder")
        _refuse_special_files(path)
        reader = sitk.ImageSeriesReader()
        try:
            ids = reader.GetGDCMSeriesIDs(str(path))
        except RuntimeError as exc:
            raise InputError(f"{path}: cannot list DICOM series ({_first_line(exc)})") from None
        if not ids:
            raise InputError(f"{path}: is a directory holding no DICOM series (not an image file)")
        if len(ids) > 1:
            raise InputError(
                f"{path}: holds {len(ids)} DICOM series ({', '.join(ids[:3])}"
                f"{', ...' if len(ids) > 3 else ''}); put one series per folder"
            )
        names = reader.GetGDCMSeriesFileNames(str(path), ids[0])
        _check_series_files(path, names)
        _check_slice_spacing(path, names)
        reader.SetFileNames(names)
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise InputError(f"{path}: cannot read the DICOM series ({_first_line(exc)})") from None
        return _decode(image, path)

    def write(self, path: Path, array: np.ndarray, meta: VolumeMeta, key: str) -> Path:
        return format_for(path).write(path, array, meta, key)


register_format(NrrdFormat())
register_format(MhaFormat())
register_format(MhdFormat())
register_format(DicomSeriesFormat())
