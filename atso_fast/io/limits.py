"""Memory budget for untrusted inputs: refuse a case before allocating what cannot fit.

A 2 MB ``.nii.gz`` can expand to gigabytes, and a header claiming 100 mm voxels makes resampling
blow a small scan up; allocating first and failing later gets the whole run OOM-killed (and a
resumed run dies on the same file again). Readers and the preprocessing plan call
:func:`check_bytes` with what they are about to allocate; the budget is what this process may
still use: the least of the memory the kernel reports available, the cgroup's limit less its
usage, and the address-space limit (``ulimit -v``) less what is mapped. It is read at each call
(never at import), so a limit set after start-up counts.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from atso_fast.io.base import InputError

__all__ = ["DECODE_SHARE", "check_bytes", "memory_budget"]

DECODE_SHARE = 4
"""A decoded scan may take at most 1/4 of the budget: the pipeline holds the scan, its float32
copy on the network's grid and the resampling temporaries at once."""

_CGROUP = Path("/sys/fs/cgroup")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):
        return None
    return int(text) if text.isdigit() else None


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    limit = _read_int(_CGROUP / "memory.max")  # cgroup v2 ("max" -> None)
    used = _read_int(_CGROUP / "memory.current")
    if limit is None:
        limit = _read_int(_CGROUP / "memory" / "memory.limit_in_bytes")  # v1
        used = _read_int(_CGROUP / "memory" / "memory.usage_in_bytes")
        if limit is not None and limit >= 1 << 60:  # v1's "unlimited"
            limit = None
    return None if limit is None else max(0, limit - (used or 0))


def _address_space_room() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    mapped = 0
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmSize:"):
                    mapped = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return max(0, soft - mapped)


def memory_budget() -> int | None:
    """Bytes this process may still allocate (the least of the limits above), or ``None`` when
    none is known (no ``/proc``: other systems)."""
    rooms = [r for r in (_meminfo("MemAvailable"), _cgroup_room(), _address_space_room()) if r is not None]
    return min(rooms) if rooms else None


def check_bytes(
    path: str | os.PathLike[str] | None, nbytes: int, what: str, *, share: int = 1, budget: int | None = None
) -> None:
    """Refuse to allocate ``nbytes`` for ``what`` when it exceeds ``1/share`` of the budget.

    Args:
        path: the input it is for (named in the message).
        nbytes: bytes about to be allocated.
        what: e.g. ``"decoded image 512 x 512 x 300 int16"``.
        share: the fraction of the budget this allocation may take.
        budget: the budget in bytes (default :func:`memory_budget`).

    Raises:
        InputError: over the budget; the message gives both numbers.
    """
    budget = memory_budget() if budget is None else budget
    if budget is None or nbytes * share <= budget:
        return
    name = f"{path}: " if path is not None else ""
    raise InputError(
        f"{name}{what} needs {_gib(nbytes)}, more than the {_gib(budget // share)} this process can "
        f"spare for it (1/{share} of {_gib(budget)} free); refused before allocating"
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
