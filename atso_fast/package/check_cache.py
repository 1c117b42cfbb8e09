"""The package checks that need the ``onnx`` library (the graph's shapes, its largest tensor),
remembered per ONNX hash.

On a planner-sized network those checks cost about a second of every start (importing onnx,
parsing 250 MB, shape inference) for bytes that were checked before. A passed check is stored
under a key of the ONNX file's sha256, the fields it was checked against and this code's
version, in ``$XDG_CACHE_HOME/atso_fast/checks`` with the compiled-model cache's safeguards
(:class:`~atso_fast.io.blob_cache.BlobCache`: a private folder of this user, each entry's
own sha256 beside it); a failed check is never stored, so it runs, and fails, every time.
``ATSO_FAST_CHECK_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from atso_fast.io.blob_cache import BlobCache, cache_root

__all__ = ["CHECKS_VERSION", "remembered"]

CHECKS_VERSION = 1
"""Part of every key: bump it when a check changes what it accepts."""


def remembered(kind: str, key: Sequence[Any], compute: Callable[[], Any]) -> Any:
    """``compute()`` (a JSON value), or what it returned for the same ``kind`` and ``key`` before.

    Raises:
        whatever ``compute`` raises (nothing is stored then).
    """
    if os.environ.get("ATSO_FAST_CHECK_CACHE", "1") == "0":
        return compute()
    from atso_fast import __version__

    cache = BlobCache(cache_root() / "checks", "package checks", "result")
    name = json.dumps([CHECKS_VERSION, __version__, kind, *key], sort_keys=True, default=str)
    digest = hashlib.sha256(name.encode()).hexdigest()[:32]
    stored = cache.load(digest)
    if stored is not None:
        try:
            return json.loads(stored)["value"]
        except (ValueError, KeyError, TypeError):  # not ours: computed again and overwritten
            pass
    value = compute()
    with warnings.catch_warnings():  # a cache that cannot be written only costs the check next time
        warnings.simplefilter("ignore", RuntimeWarning)
        cache.store(digest, json.dumps({"value": value}).encode())
    return value
