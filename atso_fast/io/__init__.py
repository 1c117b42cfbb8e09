"""Volume readers and writers (a registry of formats), names, listing and the JSONL manifest.

Every array this package returns or accepts is ``(Z, Y, X)`` or ``(M, Z, Y, X)`` (``M`` =
channels), C-contiguous (``atso_fast/CONTRACTS.md``). Formats: ``nifti`` (``.nii``, ``.nii.gz``),
``npy``, ``npz``, and through SimpleITK ``nrrd`` (``.nrrd``, ``.nhdr``), ``mha``, ``mhd`` and
``dicom`` (a folder holding one series; NIfTI outputs), and through Pillow ``png`` and ``jpeg``
(natural images: colour frames ``(3, 1, H, W)``, label PNGs; PNG outputs); each is one class in the registry
(:mod:`atso_fast.io.registry`). Every write is atomic (:mod:`atso_fast.io.atomic`).
"""

from __future__ import annotations

from atso_fast.io import images as _images  # noqa: F401  (registers the formats)
from atso_fast.io import nifti as _nifti  # noqa: F401  (registers the format)
from atso_fast.io import numpy_io as _numpy_io  # noqa: F401  (registers the formats)
from atso_fast.io import sitk as _sitk  # noqa: F401  (registers the formats)
from atso_fast.io.atomic import (
    atomic_write_bytes,
    commit_temp,
    is_stale_temp,
    is_temp_name,
)
from atso_fast.io.base import InputError, VolumeMeta, has_nonfinite
from atso_fast.io.files import not_regular_error, read_regular_file
from atso_fast.io.listing import (
    LIST_SUFFIXES,
    Listing,
    input_root,
    list_inputs,
    scan_inputs,
    select_part,
)
from atso_fast.io.manifest import MANIFEST_FIELDS, Manifest
from atso_fast.io.naming import case_id, output_path
from atso_fast.io.nifti import GZIP_LEVEL
from atso_fast.io.registry import (
    ImageFormat,
    folder_format,
    format_for,
    formats,
    image_suffix,
    read_volume,
    register_format,
    supported_suffixes,
    volume_format,
    write_confidence,
    write_labels,
)
from atso_fast.io.sitk import is_dicom_folder

__all__ = [
    "GZIP_LEVEL",
    "ImageFormat",
    "InputError",
    "LIST_SUFFIXES",
    "Listing",
    "MANIFEST_FIELDS",
    "Manifest",
    "VolumeMeta",
    "atomic_write_bytes",
    "case_id",
    "commit_temp",
    "folder_format",
    "format_for",
    "is_dicom_folder",
    "formats",
    "has_nonfinite",
    "image_suffix",
    "input_root",
    "is_stale_temp",
    "is_temp_name",
    "list_inputs",
    "not_regular_error",
    "output_path",
    "read_regular_file",
    "read_volume",
    "register_format",
    "scan_inputs",
    "select_part",
    "supported_suffixes",
    "volume_format",
    "write_confidence",
    "write_labels",
]
