"""Atomic file writes: temp file in the same folder, ``fsync``, ``os.replace``.

A process killed at any point leaves either the old file or the complete new one; the temp file
is hidden (``.NAME.atso-PID-TOKEN.tmp``) so listings and resumed runs can recognise it.
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "commit_temp", "is_temp_name", "temp_path", "TMP_MARK"]

TMP_MARK = ".atso-"


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
    tmp = temp_path(path)
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


def temp_path(path: str | os.PathLike[str]) -> Path:
    """The hidden temp name :func:`atomic_write_bytes` uses for ``path`` (same folder)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}.tmp")


def commit_temp(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Make a complete file written by a library at ``tmp`` durable and rename it to ``path``
    (fsync, ``os.replace``, fsync the folder); ``tmp`` is removed if that fails."""
    tmp, path = Path(tmp), Path(path)
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
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
    return name.startswith(".") and TMP_MARK in name and name.endswith(".tmp")


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
