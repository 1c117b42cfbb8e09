"""What an input argument names: a folder, a list file or one image; and the part split.

Listing never opens an image and never blocks: folder entries are only named (a FIFO, socket or
folder with an image suffix is listed, and fails as one case when it is about to be read), and
list files are read only when they are regular files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atso_fast.io.base import InputError
from atso_fast.io.files import read_regular_file
from atso_fast.io.registry import image_suffix, supported_suffixes
from atso_fast.io.sitk import is_dicom_folder

__all__ = ["LIST_SUFFIXES", "MAX_LIST_BYTES", "Listing", "input_root", "list_inputs", "scan_inputs", "select_part"]

LIST_SUFFIXES = (".txt", ".lst")
"""Suffixes of list files accepted by :func:`list_inputs`."""
MAX_LIST_BYTES = 256 * 1024 * 1024
"""A list file larger than this is refused (one path per line: millions of cases fit)."""


@dataclass
class Listing:
    """What :func:`scan_inputs` found.

    Attributes:
        paths: candidate image files in a deterministic order (not resolved, never opened).
        root: the folder case ids are relative to; ``None`` for a list file, whose cases are
            named by their file names (outputs land at ``OUTPUT/<name>``, like nnU-Net).
        failed: ``(entry id, path, message)`` for entries that cannot even be listed (an
            unreadable sub-folder is ``"sub/"``, a bad list line ``"cases.txt:7"``): each
            becomes one failed manifest row.
        skipped: ``(path, reason)`` for image-like entries left out on purpose (hidden files,
            linked folders); reported, never silently dropped.
    """

    paths: list[Path]
    root: Path | None
    failed: list[tuple[str, Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def input_root(inputs: str | os.PathLike[str]) -> Path:
    """The folder case ids are taken relative to: the folder itself, or a file's (or a DICOM
    series folder's) parent."""
    inputs = Path(inputs)
    return inputs if inputs.is_dir() and not is_dicom_folder(inputs) else inputs.parent


def list_inputs(inputs: str | os.PathLike[str], *, recursive: bool = False) -> list[Path]:
    """Image files named by ``inputs`` (``scan_inputs(inputs).paths``).

    Args:
        inputs: a folder (entries with a supported suffix, sorted by relative path; hidden
            entries left out; sub-folders too when ``recursive``, but symlinked folders are not
            followed, so link cycles cannot loop; a sub-folder holding DICOM files is one input,
            a DICOM series, and is not descended into; a folder that itself holds DICOM files is
            that one series), a list file (``.txt`` / ``.lst``: one path per line, relative to
            the list file's folder, blank lines and ``#`` comment lines skipped; entries are kept
            even if missing, so they fail per case), or one image.
        recursive: descend into sub-folders of a folder input.

    Raises:
        InputError: ``inputs`` does not exist, cannot be read, or is neither kind.
    """
    return scan_inputs(inputs, recursive=recursive).paths


def scan_inputs(inputs: str | os.PathLike[str], *, recursive: bool = False) -> Listing:
    """List ``inputs`` (see :func:`list_inputs`) with what could not be listed and what was left out.

    Raises:
        InputError: ``inputs`` does not exist, is not a regular file or folder, cannot be
            listed or read, or is neither kind.
    """
    inputs = Path(inputs)
    if inputs.is_dir():
        return Listing([inputs], inputs.parent) if is_dicom_folder(inputs) else _scan_folder(inputs, recursive)
    if not os.path.lexists(inputs):
        raise InputError(f"{inputs}: no such file or folder")
    if inputs.suffix.lower() in LIST_SUFFIXES:
        return _read_list(inputs)
    if image_suffix(inputs) is None:
        raise InputError(
            f"{inputs}: neither a folder, a list file ({', '.join(LIST_SUFFIXES)}) "
            f"nor an image ({', '.join(supported_suffixes())})"
        )
    return Listing([inputs], inputs.parent)


def _scan_folder(folder: Path, recursive: bool) -> Listing:
    listing = Listing([], folder)
    found: list[tuple[str, Path]] = []

    def unlisted(exc: OSError) -> None:
        where = Path(exc.filename or folder)
        if os.path.abspath(where) == os.path.abspath(folder):
            raise InputError(f"{folder}: cannot list folder ({exc.strerror or exc})")
        rel = where.relative_to(folder).as_posix() + "/"
        listing.failed.append(
            (rel, where, f"{where}: cannot list folder ({exc.strerror or exc}); its cases were not relabelled")
        )

    for here, dirs, files in os.walk(folder, onerror=unlisted):
        base, rel_here = Path(here), Path(here).relative_to(folder)
        keep = []
        for name in sorted(dirs):
            path = base / name
            if not _candidate(name, path, listing):
                continue
            if is_dicom_folder(path):  # one series: one input, not descended into
                found.append(((rel_here / name).as_posix(), path))
                continue
            if image_suffix(name) is not None:
                found.append(((rel_here / name).as_posix(), path))  # fails as "is a directory"
            if recursive:
                if os.path.islink(path):
                    listing.skipped.append((path, "symbolic link to a folder, not followed"))
                else:
                    keep.append(name)
        dirs[:] = keep
        for name in files:
            if image_suffix(name) is not None and _candidate(name, base / name, listing):
                found.append(((rel_here / name).as_posix(), base / name))
    listing.paths = [path for _, path in sorted(found)]
    listing.failed.sort()
    listing.skipped.sort()
    return listing


def _candidate(name: str, path: Path, listing: Listing) -> bool:
    """A non-hidden entry; a hidden one that looks like an image is reported as skipped."""
    if not name.startswith("."):
        return True
    if image_suffix(name) is not None:
        listing.skipped.append((path, "hidden file (name starts with '.'), left out; rename it to include it"))
    return False


def _read_list(list_file: Path) -> Listing:
    """Entries of a list file: bytes decoded like file names (any encoding the OS allows)."""
    data = read_regular_file(list_file, max_bytes=MAX_LIST_BYTES)
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise InputError(f"{list_file}: list file is UTF-16; save it as UTF-8 (one path per line)")
    listing = Listing([], None)
    base = list_file.parent
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = os.fsdecode(raw.rstrip(b"\r")).strip()
        if number == 1:
            line = line.lstrip("\ufeff")  # a UTF-8 byte order mark
        if not line or line.startswith("#"):
            continue
        if "\x00" in line:
            listing.failed.append(
                (
                    f"{list_file.name}:{number}",
                    base / line.replace("\x00", ""),
                    f"{list_file}:{number}: path contains a NUL byte; refused",
                )
            )
            continue
        listing.paths.append(base / line)
    return listing


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
