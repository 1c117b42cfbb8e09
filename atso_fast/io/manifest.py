"""The JSONL manifest of a bulk run: one row per case, append-only, safe against ``kill -9``."""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from atso_fast.io.atomic import atomic_write_bytes

try:  # POSIX advisory locks; elsewhere processes sharing one manifest are not coordinated
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]  # a module name rebound to None: no annotation can say so

__all__ = ["MANIFEST_FIELDS", "Manifest"]

MANIFEST_FIELDS = (
    "case_id",
    "input",
    "status",
    "shape",
    "seconds",
    "label_counts",
    "ignored_fraction",
    "mean_confidence",
    "outputs",
    "error",
    "spacing",
    "timings",
)
"""Keys of a manifest row, in the order they are written (missing keys are written as null).

``case_id`` (see :func:`case_id`), ``input`` (path as listed), ``status`` (``"ok"``|``"failed"``),
``shape`` (``[Z, Y, X]`` of the label map), ``seconds`` (time inside ``relabel_volume``),
``label_counts`` / ``ignored_fraction`` / ``mean_confidence`` (from the engine's stats),
``outputs`` (``{"labels": path, "confidence": path}`` relative to the manifest's folder),
``error`` (one line naming the file and the problem, for failed rows), ``spacing`` (the input's
``[z, y, x]`` mm, null when the file has none), ``timings`` (seconds inside ``relabel_volume``:
``preprocess``, ``network``, ``stitch``, ``export``). Non-finite floats are written as null so every
line is strict JSON.
"""


class Manifest:
    """Append-only JSONL record of relabelled cases, safe against ``kill -9``.

    Each :meth:`append` is one ``os.write`` of one complete line on an ``O_APPEND`` descriptor
    followed by ``fsync``, so a killed writer leaves at most one torn last line, and processes
    working on different parts of an archive can share one manifest. Reading skips lines that
    do not parse (a torn line); :meth:`append` first ends a torn last line with a newline.

    Row ``outputs`` map a name (``"labels"``, ``"confidence"``) to a path relative to the
    manifest's folder (absolute paths work too).

    One row per case: a run first removes the rows of the cases it is about to redo
    (:meth:`drop`, an atomic rewrite), then appends one row per case. Appends and rewrites
    hold an advisory lock on the manifest's folder (``flock``), and an appender whose file was
    replaced by another process's rewrite reopens it, so processes sharing a manifest (parts)
    never lose each other's rows.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the append descriptor (reopened by the next :meth:`append`)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def append(self, row: Mapping[str, Any]) -> None:
        """Write ``row`` as one line (keys from :data:`MANIFEST_FIELDS`, extras kept).

        Raises:
            ValueError: no ``case_id`` or a status other than ``"ok"`` / ``"failed"``.
        """
        if not row.get("case_id") or row.get("status") not in ("ok", "failed"):
            raise ValueError(f"manifest row needs a case_id and status 'ok'|'failed', got {row!r}")
        full = {key: row.get(key) for key in MANIFEST_FIELDS}
        full.update((k, v) for k, v in row.items() if k not in full)
        line = (json.dumps(_jsonable(full), allow_nan=False) + "\n").encode("utf-8")
        with self._lock, self._folder_lock():
            fd = self._open()
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)

    def drop(self, case_ids: Collection[str]) -> int:
        """Remove every row of ``case_ids`` (and torn lines) in one atomic rewrite; returns how
        many lines went. Rows of other cases (another part's, say) are kept as they are."""
        drop = set(case_ids)
        with self._lock, self._folder_lock():
            try:
                lines = self.path.read_bytes().splitlines(keepends=True)
            except FileNotFoundError:
                return 0
            kept = [line for line in lines if _row_id(line) not in drop and _row_id(line) is not None]
            if len(kept) == len(lines):
                return 0
            kept = [line if line.endswith(b"\n") else line + b"\n" for line in kept]
            atomic_write_bytes(self.path, kept)
            return len(lines) - len(kept)

    @contextmanager
    def _folder_lock(self) -> Iterator[None]:
        """An exclusive ``flock`` on the manifest's folder (the file itself is replaced by
        :meth:`drop`, so it cannot carry the lock); a no-op where locks are unavailable."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            yield
            return
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError:  # file systems without flock support
                    pass
            yield
        finally:
            os.close(fd)  # releases the lock

    def _open(self) -> int:
        if self._fd is not None and not _same_file(self._fd, self.path):
            os.close(self._fd)  # another process rewrote the manifest: append to the new file
            self._fd = None
        if self._fd is None:
            # never through a link: a planted manifest.jsonl -> elsewhere would get our rows
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
            if _ends_torn(self.path):
                os.write(fd, b"\n")
            self._fd = fd
        return self._fd

    def rows(self) -> list[dict[str, Any]]:
        """All parseable rows in file order (torn or garbled lines skipped)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        rows = []
        for line in data.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("case_id"):
                rows.append(row)
        return rows

    def latest(self) -> dict[str, dict[str, Any]]:
        """``{case_id: last row}`` (a later row supersedes an earlier one)."""
        return {row["case_id"]: row for row in self.rows()}

    def completed(self) -> dict[str, dict[str, Any]]:
        """``{case_id: row}`` for cases whose last row is ``"ok"`` and whose outputs all exist."""
        return {
            cid: row for cid, row in self.latest().items() if row.get("status") == "ok" and self._outputs_exist(row)
        }

    def _outputs_exist(self, row: Mapping[str, Any]) -> bool:
        outputs = row.get("outputs")
        if not isinstance(outputs, dict) or not outputs:
            return False
        return all(isinstance(p, str) and (self.path.parent / p).is_file() for p in outputs.values())


def _row_id(line: bytes) -> str | None:
    """The case id of a manifest line, or None for a torn or garbled one."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("case_id") or None if isinstance(row, dict) else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _ends_torn(path: Path) -> bool:
    """Whether a non-empty file does not end with a newline."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return False
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"
    except OSError:
        return False


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays to Python, non-finite floats to ``None``."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value if value is None or isinstance(value, str) else str(value)
