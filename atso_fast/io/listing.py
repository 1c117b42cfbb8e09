"""What an input argument names: a folder, a list file or one image; and the part split."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from atso_fast.io.base import InputError
from atso_fast.io.registry import image_suffix, supported_suffixes
from atso_fast.io.sitk import is_dicom_folder

__all__ = ["LIST_SUFFIXES", "input_root", "list_inputs", "select_part"]

LIST_SUFFIXES = (".txt", ".lst")
"""Suffixes of list files accepted by :func:`list_inputs`."""


def input_root(inputs: str | os.PathLike[str]) -> Path:
    """The folder case ids are taken relative to: the folder itself, or a file's (or a DICOM
    series folder's) parent."""
    inputs = Path(inputs)
    return inputs if inputs.is_dir() and not is_dicom_folder(inputs) else inputs.parent


def list_inputs(inputs: str | os.PathLike[str], *, recursive: bool = False) -> list[Path]:
    """Image files named by ``inputs``.

    Args:
        inputs: a folder (files with a supported suffix, sorted by relative path, hidden files
            and folders skipped; sub-folders too when ``recursive``, but symlinked folders are
            not followed, so link cycles cannot loop; a sub-folder holding DICOM files is one
            input, a DICOM series, and is not descended into; a folder that itself holds DICOM
            files is that one series), a list file (``.txt`` /
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
        return [inputs] if is_dicom_folder(inputs) else _scan_folder(inputs, recursive)
    if not inputs.exists():
        raise InputError(f"{inputs}: no such file or folder")
    if inputs.suffix.lower() in LIST_SUFFIXES:
        return _read_list(inputs)
    if image_suffix(inputs) is None:
        raise InputError(f"{inputs}: neither a folder, a list file ({', '.join(LIST_SUFFIXES)}) "
                         f"nor an image ({', '.join(supported_suffixes())})")
    return [inputs]


def _scan_folder(folder: Path, recursive: bool) -> list[Path]:
    found: list[tuple[str, Path]] = []

    def fail(exc: OSError) -> None:
        raise InputError(f"{exc.filename}: cannot list folder ({exc.strerror})")

    for here, dirs, files in os.walk(folder, onerror=fail):
        rel_here = Path(here).relative_to(folder)
        series = {d for d in dirs if not d.startswith(".") and is_dicom_folder(Path(here) / d)}
        found += [((rel_here / d).as_posix(), Path(here) / d) for d in series]
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in series) if recursive else []
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
