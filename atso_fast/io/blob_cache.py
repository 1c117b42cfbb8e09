"""A disk cache of compiled models (OpenVINO blobs, TensorRT engines) that is not trusted blindly.

A compiled blob runs as the model: a blob planted under a cache key would relabel every scan with
whatever it computes while the package's own hashes pass. So a blob is loaded only when
- the cache folder is a real folder (no link) owned by this user and writable by no one else,
- the blob is a regular file (no link) owned by this user, and
- its sha256 equals the one recorded beside it (``KEY.sha256``) when this process's code wrote it.
Anything else is ignored (and overwritten on the next store): the model is compiled again.
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

from atso_fast.io.atomic import atomic_write_bytes
from atso_fast.io.files import read_regular_file

__all__ = ["BlobCache", "cache_root"]

T = TypeVar("T")


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/atso_fast`` (``~/.cache/atso_fast`` without it), read on each call."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atso_fast"


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
        found = self._read(key)
        if found is None:
            return None
        data, recorded = found
        return data if hashlib.sha256(data).hexdigest() == recorded else None

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
        return built if matches else None

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
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.trusted_folder():
                raise OSError(f"{self.folder} is not a private folder of this user (owner, mode or link)")
            os.chmod(atomic_write_bytes(blob, data), 0o600)
            atomic_write_bytes(digest, hashlib.sha256(data).hexdigest().encode("ascii"))
        except OSError as exc:
            warnings.warn(f"{self.what}: {self.thing} not cached at {blob} ({exc})", RuntimeWarning, stacklevel=3)
