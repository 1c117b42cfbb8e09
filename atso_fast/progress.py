"""Progress of long work on stderr (training steps, cache building, benchmarks): never minutes of
silence.

A :class:`Progress` prints one line when a piece of work starts, then at most one every
``every`` seconds, then one when it ends: what runs, how far, the pace and an ETA. Lines, not a
redrawn bar, so output captured to a file (nohup, SLURM) reads as well as a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

__all__ = ["Progress", "duration", "progress_lines"]


def duration(seconds: float) -> str:
    """``"42 s"``, ``"7.5 min"`` or ``"2.3 h"``."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h"


class Progress:
    """Counts ``total`` units of one piece of work and reports on ``stream``.

    Args:
        what: e.g. ``"atso round 2: fine-tune"``.
        total: units to do (steps, cases).
        unit: their name.
        enabled: ``False`` prints nothing.
        every: seconds between lines.
        stream: default ``sys.stderr`` (read when a line is printed).
    """

    def __init__(
        self,
        what: str,
        total: int,
        *,
        unit: str = "step",
        enabled: bool = True,
        every: float = 10.0,
        stream: TextIO | None = None,
    ) -> None:
        self.what, self.total, self.unit, self.enabled, self.every = what, int(total), unit, enabled, every
        self.stream = stream
        self.start = self.last = time.perf_counter()
        self.done = 0
        self._say(f"{what}: {self.total} {unit}s")

    def update(self, done: int, note: str = "") -> None:
        """``done`` units finished; a line when ``every`` seconds have passed since the last."""
        self.done = int(done)
        now = time.perf_counter()
        if now - self.last < self.every or self.done >= self.total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / max(self.done, 1) * (self.total - self.done)
        self._say(
            f"{self.what}: {self.unit} {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%)"
            f"{', ' + note if note else ''}; {duration(elapsed)} elapsed, ETA {duration(eta)}"
        )

    def close(self, note: str = "") -> None:
        """The closing line (total time)."""
        self._say(
            f"{self.what}: done, {self.done} {self.unit}s in {duration(time.perf_counter() - self.start)}"
            f"{', ' + note if note else ''}"
        )

    def _say(self, line: str) -> None:
        if self.enabled:
            print(f"atso-fast: {line}", file=self.stream or sys.stderr, flush=True)


def progress_lines(
    items: Iterable[Any], what: str, total: int, *, unit: str = "case", enabled: bool = True
) -> Iterator[Any]:
    """``items``, reporting through a :class:`Progress` as they are consumed."""
    progress = Progress(what, total, unit=unit, enabled=enabled)
    for index, item in enumerate(items, 1):
        yield item
        progress.update(index)
    progress.close()
