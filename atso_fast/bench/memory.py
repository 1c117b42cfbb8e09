"""Peak host memory of this process: ``ru_maxrss``, ``VmHWM`` and a sampling context manager;
shared by ``atso-fast bench`` and ``benchmarks/``."""

from __future__ import annotations

import os
import resource
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["maxrss_mib", "peak_rss_mib", "reset_peak_rss", "PeakMemory"]

_MIB = 2.0**20


def maxrss_mib() -> float:
    """Peak resident memory of this process so far (``ru_maxrss``, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB: ``VmHWM`` (reset by :func:`reset_peak_rss`),
    else ``ru_maxrss``. ``VmHWM`` first because a child inherits its parent's ``ru_maxrss`` across
    fork + exec, so a parent that already held more hides the child's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return maxrss_mib()


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (``ru_maxrss``/VmHWM) to its current RSS.

    Linux (>= 4.0) only, through ``/proc/self/clear_refs``; returns False where that is not
    possible, and ``ru_maxrss`` then keeps the lifetime peak (a baseline taken from it can hide
    part of a later peak).
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the lifetime peak is all we have
        return int(maxrss_mib() * _MIB)


class PeakMemory:
    """Context manager sampling this process's resident set size on a background thread.

    torch and ONNX Runtime allocate outside Python's allocator, so ``tracemalloc`` misses them;
    RSS does not. Attributes after exit: ``start_mib``, ``peak_mib``, ``delta_mib``.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = float(interval_s)
        self.start_mib = self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="atso-bench-rss", daemon=True)

    @property
    def delta_mib(self) -> float:
        return max(self.peak_mib - self.start_mib, 0.0)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mib = max(self.peak_mib, _rss_bytes() / _MIB)

    def __enter__(self) -> Self:
        self.start_mib = self.peak_mib = _rss_bytes() / _MIB
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, _rss_bytes() / _MIB)
