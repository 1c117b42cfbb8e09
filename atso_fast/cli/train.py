"""``atso-fast train``: :func:`atso_fast.train.cli.train_main` with the Ray engine on offer
(``--engine ray``), which the training layer itself may not import (``CONTRACTS.md``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from atso_fast.ray_engine import relabel_archive_ray
from atso_fast.train.cli import train_main

__all__ = ["main", "ray_archive_engine"]


def ray_archive_engine(
    package_dir: Path, inputs: Sequence[Path], output_dir: Path, *, options: dict[str, Any], **kw: Any
) -> dict[str, Any]:
    """The Ray engine as an ATSO round's archive engine: ``options`` (the config's ``relabel``
    dict) hold Relabeler arguments and Ray pool options (``workers``, ``address``, ...)."""
    return relabel_archive_ray(str(package_dir), [str(p) for p in inputs], output_dir, **kw, **options)


def main(argv: list[str] | None = None) -> int:
    """``atso-fast train ...``; returns the exit code."""
    return train_main(argv, engines={"ray": ray_archive_engine})
