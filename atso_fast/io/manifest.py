"""The JSONL manifest of a bulk run: one row per case, append-only, safe against ``kill -9``."""
from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MANIFEST_FIELDS", "Manifest"]

MANIFEST_FIELDS = ("case_id", "input", "status", "shape", "seconds", "label_counts",
                   "ignored_fraction", "mean_confidence", "outputs", "error", "spacing", "timings")
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
        with self._lock:
            fd = self._open()
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
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
        return {cid: row for cid, row in self.latest().items()
                if row.get("status") == "ok" and self._outputs_exist(row)}

    def _outputs_exist(self, row: Mapping[str, Any]) -> bool:
        outputs = row.get("outputs")
        if not isinstance(outputs, dict) or not outputs:
            return False
        return all(isinstance(p, str) and (self.path.parent / p).is_file() for p in outputs.values())


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
