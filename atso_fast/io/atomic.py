"""Atomic file writes: temp file in the same folder, ``fsync``, ``os.replace``.

A process killed at any point leaves either the old file or the complete new one; the temp file
is hidden (``.NAME.atso-PID-START-TOKEN.tmp``: the writer's process id and start time) so
listings and resumed runs can recognise it, and tell a killed writer's leftovers from the temp
files of a writer that is still running (:func:`is_stale_temp`).
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12 on

__all__ = ["atomic_write_bytes", "commit_temp", "is_stale_temp", "is_temp_name", "temp_path", "TMP_MARK"]

TMP_MARK = ".atso-"
_OWNER = re.compile(r"\.atso-(\d+)(?:-(\d+))?-[0-9a-f]+\.(?:tmp|dir)$")
# a bytes-like object; a TypeVar rather than Buffer itself so that a list[bytes] fits list[_Chunk]
_Chunk = TypeVar("_Chunk", bound="Buffer")


def atomic_write_bytes(path: str | os.PathLike[str], data: _Chunk | list[_Chunk] | tuple[_Chunk, ...]) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    A reader (or a resumed run) sees either the previous file or the complete new one; the
    temp file is hidden (see :func:`temp_path`) and removed if the write fails.

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
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return commit_temp(tmp, path)


def temp_path(path: str | os.PathLike[str], *, pid: int | None = None, folder: bool = False) -> Path:
    """A fresh temp name for writing ``path``: ``.NAME.atso-PID-START-TOKEN.tmp`` in its folder.

    Args:
        pid: the writing process (default this one); ``START`` is its start time (Linux
            ``/proc``), so a later process that reuses the id is not mistaken for the writer.
        folder: a temp folder name (``.dir``) for writers that produce several files.
    """
    path = Path(path)
    pid = os.getpid() if pid is None else int(pid)
    start = _own_start() if pid == os.getpid() else _start_time(pid)
    owner = f"{pid}-{start}" if start is not None else str(pid)
    return path.with_name(f".{path.name}{TMP_MARK}{owner}-{secrets.token_hex(4)}.{'dir' if folder else 'tmp'}")


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
    """Whether ``name`` is a temp file left by :func:`atomic_write_bytes` (``.tmp``) or a temp
    folder of a multi-file writer (``.dir``, see :func:`temp_path`), e.g. after a kill."""
    return name.startswith(".") and TMP_MARK in name and name.endswith((".tmp", ".dir"))


def is_stale_temp(name: str) -> bool:
    """Whether ``name`` is a temp file whose writer is gone (killed), so it may be deleted.

    A temp file of a live process (a concurrent run writing into the same folder) is not stale.
    The writer is identified by process id and, where recorded, start time (ids are reused).
    A name without a parseable writer counts as stale (an older atso-fast wrote it).
    """
    if not is_temp_name(name):
        return False
    match = _OWNER.search(name)
    if match is None:
        return True
    pid, start = int(match.group(1)), match.group(2)
    if start is not None and _start_time(pid) is not None:
        return _start_time(pid) != int(start)
    return not _pid_alive(pid)


_OWN_START: dict[int, int | None] = {}


def _own_start() -> int | None:
    """This process's start time, read once per process id (a forked child reads its own)."""
    pid = os.getpid()
    if pid not in _OWN_START:
        _OWN_START[pid] = _start_time(pid)
    return _OWN_START[pid]


def _start_time(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return int(fields[19])  # field 22 of stat(5); fields[0] is field 3
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


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
