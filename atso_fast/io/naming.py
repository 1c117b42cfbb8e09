"""Case names and output paths (never outside the output folder, never over an input)."""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from atso_fast.io.base import InputError
from atso_fast.io.registry import image_suffix

__all__ = ["case_id", "channel_groups", "channel_index", "output_path"]

_CHANNEL = re.compile(r"^(.+)_(\d{4})$")


def case_id(path: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> str:
    """Case name: ``path`` relative to ``root`` without the image suffix, ``/``-separated.

    ``root/a/b/case1.nii.gz`` gives ``"a/b/case1"``; nnU-Net's ``_0000`` channel suffix is
    stripped (``case1_0000.nii.gz`` gives ``"case1"``). A path outside ``root``, or any path
    when ``root`` is ``None`` (the entries of a list file), gives its bare name.

    Raises:
        InputError: the name is empty once the suffix is removed.
    """
    path = Path(os.path.abspath(path))
    try:
        rel = path.relative_to(os.path.abspath(root)) if root is not None else Path(path.name)
    except ValueError:
        rel = Path(path.name)
    name = rel.name
    suffix = image_suffix(name)
    stem = name[: len(name) - len(suffix)] if suffix else name
    if stem.endswith("_0000") and len(stem) > 5:
        stem = stem[:-5]
    if not stem:
        raise InputError(f"{path}: file name has no case name before its suffix")
    return (rel.parent / stem).as_posix()


def channel_index(path: str | os.PathLike[str]) -> tuple[str, int] | None:
    """``(CASE, K)`` for an nnU-Net channel file ``CASE_KKKK.<suffix>`` (``K`` four digits), else
    ``None``."""
    name = Path(path).name
    suffix = image_suffix(name)
    match = _CHANNEL.match(name[: len(name) - len(suffix)] if suffix else name)
    return (match.group(1), int(match.group(2))) if match else None


def channel_groups(paths: Sequence[Path]) -> list[tuple[Path, ...]]:
    """Group nnU-Net channel files into cases, by nnU-Net's rule: ``CASE_0000``, ``CASE_0001``,
    ... of one folder are the channels of case ``CASE`` (sorted by channel). A group forms only
    where ``CASE_0000`` exists, so an archive that merely numbers its scans (``scan_0001``,
    ``scan_0002``, no ``_0000``) keeps one case per file. Order: that of each group's first file.
    """
    index: dict[Path, tuple[tuple[str, str], int]] = {}
    for path in paths:
        found = channel_index(path)
        if found is not None:
            index[path] = ((os.path.dirname(os.path.abspath(path)), found[0]), found[1])
    grouped = {key for key, channel in index.values() if channel == 0}
    groups: dict[Any, list[Path]] = {}
    for path in paths:
        key = index[path][0] if path in index and index[path][0] in grouped else ("file", path)
        groups.setdefault(key, []).append(path)
    return [tuple(sorted(g, key=lambda p: index[p][1])) if len(g) > 1 else (g[0],) for g in groups.values()]


def output_path(
    output_dir: str | os.PathLike[str], case_id: str, suffix: str, *, inputs: Collection[str | os.PathLike[str]] = ()
) -> Path:
    """``output_dir / (case_id + suffix)``, refused when it could escape or clobber an input.

    Args:
        output_dir: the output folder.
        case_id: relative ``/``-separated case name (see :func:`case_id`).
        suffix: e.g. ``".nii.gz"`` or ``"_confidence.nii.gz"``; no path separators.
        inputs: input files the result must not equal (compared after resolving links).

    Raises:
        ValueError: absolute or empty case id, ``..``/``.`` parts, a separator in ``suffix``,
            a symlink that leads outside ``output_dir``, or the result equals an input file.
    """
    if not case_id or "\x00" in case_id or "\\" in case_id or case_id.startswith("/"):
        raise ValueError(f"case id must be a relative '/'-separated name, got {case_id!r}")
    parts = case_id.split("/")
    if any(p in ("", ".", "..") for p in parts) or Path(case_id).is_absolute():
        raise ValueError(f"case id must not contain empty, '.' or '..' parts, got {case_id!r}")
    if not suffix or any(sep in suffix for sep in ("/", "\\", "\x00")):
        raise ValueError(f"output suffix must be a plain name ending, got {suffix!r}")
    base = Path(output_dir)
    out = base.joinpath(*parts[:-1], parts[-1] + suffix)
    real_out, real_base = os.path.realpath(out), os.path.realpath(base)
    if os.path.commonpath([real_out, real_base]) != real_base or real_out == real_base:
        raise ValueError(f"output {out} resolves to {real_out}, outside the output folder {base}")
    if any(real_out == os.path.realpath(p) for p in inputs):
        raise ValueError(f"output {out} would overwrite an input file")
    return out
