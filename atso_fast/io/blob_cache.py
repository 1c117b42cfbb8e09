"""A disk cache of compiled models (OpenVINO blobs, TensorRT engines) that is not trusted blindly.

A compiled blob runs as the model: a blob planted under a cache key would relabel every scan with
whatever it computes while the package's own hashes pass. So a blob is loaded only when
- the cache folder is a real folder (no link) owned by this user and writable by no one else,
- the blob is a regular file (no link) owned by this user, and
- its sha256 equals the one recorded beside it (``KEY.sha256``) when this process's code wrote it.
Anything else is ignored (and overwritten on the next store): the model is compiled again.

A folder keeps at most ``ATSO_FAST_CACHE_GB`` GiB of blobs (default 8; a planner-sized nnU-Net
network compiles to ~250 MB per precision and batch size): each store removes the least recently
used ones beyond it (a load marks a blob used), and temp files of writers that died. ``0`` stores
nothing.
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from atso_fast.io.atomic import atomic_write_bytes, is_stale_temp
from atso_fast.io.files import read_regular_file

__all__ = ["DEFAULT_CACHE_GB", "BlobCache", "cache_limit", "cache_root"]

DEFAULT_CACHE_GB = 8.0

T = TypeVar("T")


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/atso_fast`` (``~/.cache/atso_fast`` without it), read on each call."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atso_fast"


def cache_limit() -> int:
    """Bytes of blobs one cache folder keeps: ``ATSO_FAST_CACHE_GB`` GiB (default
    :data:`DEFAULT_CACHE_GB`), read on each call; a value that is not a number >= 0 is warned
    about and the default used."""
    text = os.environ.get("ATSO_FAST_CACHE_GB", "").strip()
    if not text:
        return int(DEFAULT_CACHE_GB * 2**30)
    try:
        gib = float(text)
        if not gib >= 0 or gib == float("inf"):
            raise ValueError
    except ValueError:
        warnings.warn(
            f"ATSO_FAST_CACHE_GB={text!r} is not a number of GiB >= 0; using {DEFAULT_CACHE_GB:g}",
            RuntimeWarning,
            stacklevel=3,
        )
        gib = DEFAULT_CACHE_GB
    return int(gib * 2**30)


def _private(info: os.stat_result) -> bool:
    return info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class BlobCache:
    """Compiled blobs under ``folder``, keyed by a caller's key (model hash + settings).

    Args:
        folder: the cache folder (created ``0700`` on the first store).
        what: who caches (``"runtime openvino"``), for warnings.
        thing: what a blob is, for warnings.
    """

    def __init__(self, folder: str | os.PathLike[str], what: str, thing: str = "compiled model") -> None:
        self.folder = Path(folder)
        self.what = what
        self.thing = thing

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.folder / f"{key}.blob", self.folder / f"{key}.sha256"

    def trusted_folder(self) -> bool:
        """The folder exists, is no link, is owned by this user and is writable by no one else."""
        try:
            info = os.lstat(self.folder)
        except OSError:
            return False
        return stat.S_ISDIR(info.st_mode) and _private(info)

    def load(self, key: str) -> bytes | None:
        """The blob stored under ``key``, or ``None`` when there is none or it fails a check."""
        return self.load_with(key, lambda data: data)

    def load_with(self, key: str, use: Callable[[bytes], T | None]) -> T | None:
        """``use(blob)`` for the blob stored under ``key``, or ``None`` when there is none, it
        fails a check, or ``use`` returns ``None``. The hash is checked on another thread while
        ``use`` runs (hashlib releases the GIL): importing a 250 MB compiled model and hashing it
        overlap instead of adding up. What ``use`` built from a blob that fails the check is
        dropped before anything runs it."""
        found = self._read(key)
        if found is None:
            return None
        data, recorded = found
        with ThreadPoolExecutor(1, "atso-blob-hash") as pool:
            digest = pool.submit(lambda: hashlib.sha256(data).hexdigest())
            built = use(data)
            matches = digest.result() == recorded
        if not matches or built is None:
            return None
        self._mark_used(key)
        return built

    def _read(self, key: str) -> tuple[bytes, str] | None:
        """The blob and its recorded sha256, when both pass the file checks."""
        blob, digest = self._paths(key)
        if not self.trusted_folder():
            return None
        try:
            for path in (blob, digest):
                info = os.lstat(path)
                if not stat.S_ISREG(info.st_mode) or not _private(info):
                    return None
            data = read_regular_file(blob)
            recorded = read_regular_file(digest, max_bytes=128).decode("ascii").strip()
        except (OSError, ValueError):  # missing, unreadable, not ASCII: compile again
            return None
        return data, recorded

    def store(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` under ``key`` (blob first, then its hash); a cache that cannot be
        written, or a folder that is not private, only costs a compile next time."""
        blob, digest = self._paths(key)
        limit = cache_limit()
        if memoryview(data).nbytes > limit:  # a cache turned off, or a blob larger than all of it
            return
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.trusted_folder():
                raise OSError(f"{self.folder} is not a private folder of this user (owner, mode or link)")
            os.chmod(atomic_write_bytes(blob, data), 0o600)
            atomic_write_bytes(digest, hashlib.sha256(data).hexdigest().encode("ascii"))
            self.prune(limit, keep=key)
        except OSError as exc:
            warnings.warn(f"{self.what}: {self.thing} not cached at {blob} ({exc})", RuntimeWarning, stacklevel=3)

    def prune(self, limit: int, keep: str | None = None) -> None:
        """Remove the least recently used blobs (and their hashes) until the folder's blobs
        take at most ``limit`` bytes, never ``keep``; and temp files of writers that died."""
        blobs = []
        try:
            with os.scandir(self.folder) as entries:
                for entry in entries:
                    if is_stale_temp(entry.name):
                        _remove(Path(entry.path))
                    elif entry.name.endswith(".blob") and not entry.name.startswith("."):
                        info = _lstat(entry)
                        if info is not None and stat.S_ISREG(info.st_mode):
                            blobs.append((info.st_mtime_ns, entry.name[: -len(".blob")], info.st_size))
        except OSError:  # a folder we cannot list is pruned next time
            return
        total = sum(size for _, _, size in blobs)
        for _, name, size in sorted(blobs):
            if total <= limit:
                return
            if name != keep:
                for path in self._paths(name):
                    _remove(path)
                total -= size

    def _mark_used(self, key: str) -> None:
        """A loaded blob becomes the most recently used (its mtime is now)."""
        try:
            os.utime(self._paths(key)[0])
        except OSError:  # a read-only cache still loads; only the eviction order suffers
            pass


def _lstat(entry: os.DirEntry) -> os.stat_result | None:
    try:
        return entry.stat(follow_symlinks=False)
    except OSError:  # removed meanwhile by another process
        return None


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:  # gone already (another process pruned it), or not ours to remove
        pass
