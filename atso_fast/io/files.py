"""Opening untrusted paths without blocking: only regular files are ever opened for reading.

Opening a FIFO blocks until a writer appears (forever, in a bulk run), and opening some device
files has side effects, so every file a user hands us is checked with ``os.stat`` before it is
opened, opened with ``O_NONBLOCK`` and checked again on the open descriptor (the path may have
been swapped in between).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from atso_fast.io.base import InputError, os_error

__all__ = ["MAX_TEXT_BYTES", "file_kind", "not_regular_error", "open_regular", "read_regular_file", "read_text_file"]

MAX_TEXT_BYTES = 64 << 20
"""Largest config, list or JSON file read (plans.json, dataset.json, YAML lists: kilobytes)."""

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_kind(mode: int) -> str:
    """``"a regular file"``, ``"a directory"``, ``"a FIFO (named pipe)"``, ... for an ``st_mode``."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def not_regular_error(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` must not be opened as an image (one line naming it), or ``None`` when it is
    a regular file (links followed). Never opens the path."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"{path}: no such file" if not os.path.lexists(path) else f"{path}: broken symbolic link"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path}: symbolic link loop"
        return f"{path}: cannot stat ({exc.strerror or exc})"
    except ValueError as exc:  # an embedded NUL byte
        return f"{path!r}: invalid path ({exc})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return f"{path}: is a directory, not an image file"
    return f"{path}: is {file_kind(mode)}, not a regular file; refused (it is never opened)"


def open_regular(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of the regular file ``path``, opened without blocking and checked
    again once open (the path may have been swapped for a FIFO in between); the caller closes it.

    Raises:
        InputError: not a regular file, missing, or cannot be opened.
    """
    problem = not_regular_error(path)
    if problem:
        raise InputError(problem)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise os_error(Path(path), exc) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise InputError(f"{path}: is {file_kind(mode)}, not a regular file; refused")
    return fd


def read_regular_file(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> bytes:
    """All bytes of the regular file ``path``; anything else is refused without blocking.

    Raises:
        InputError: not a regular file (FIFO, socket, device, directory), missing, unreadable,
            or larger than ``max_bytes``.
    """
    fd = open_regular(path)
    try:
        if max_bytes is not None and os.fstat(fd).st_size > max_bytes:
            raise InputError(f"{path}: {os.fstat(fd).st_size} bytes, more than the {max_bytes} allowed")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:
        raise InputError(f"{path}: more than the {max_bytes} bytes allowed")
    return data


def read_text_file(path: str | os.PathLike[str], *, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of the regular file ``path`` (a config, list or JSON file), read without
    blocking.

    Raises:
        InputError: see :func:`read_regular_file`, or the bytes are not UTF-8.
    """
    data = read_regular_file(path, max_bytes=max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
