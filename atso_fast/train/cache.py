"""The preprocessing cache of on-disk training: every case once on the network's grid, stored
uncompressed for memory-mapping, with the foreground locations the patch sampler oversamples
(:func:`atso_fast.train.data.locate_foreground`).

Each case is brought to the grid by :func:`atso_fast.engine.preprocess.prepare`, the very code the
relabel engine runs on a scan (orientation, transpose, crop to nonzero, normalisation, resampling
to the target spacing, per the package's preprocessing spec), so training sees exactly what the
exported package sees at inference. Labels follow the same geometry with nearest-neighbour
resampling (nnU-Net resamples one-hot labels linearly; nearest keeps every voxel a real label).

Layout (``split`` is ``Tr``, ``Un`` or ``Val``)::

    CACHE/plan.json                      the resolved spec (normalisation policy, spacing, ...)
    CACHE/<split>/images/<case>.npy      (M, Z, Y, X) float32
    CACHE/<split>/labels/<case>.npy      (Z, Y, X) uint8 (labelled, validation, known truth)
    CACHE/<split>/fg/<case>.npy          flat indices of foreground voxels, int64, class by class
    CACHE/<split>/meta/<case>.json       shape, per-class counts into fg, input identity, spec hash

A case is reused when its meta file names the same inputs (absolute path, size, mtime) and the
same spec hash; ``plan.json`` is reused when the request (inputs + config) is unchanged, so a
warm cache opens no image at all. Every file is written atomically and the meta file last: a
killed build leaves no half case behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from atso_fast.engine.preprocess import axis_op, prepare
from atso_fast.io import atomic_write_bytes, case_id, commit_temp
from atso_fast.io.atomic import temp_path
from atso_fast.package import ModelPackage
from atso_fast.package.normalize import check_policy, ct_policy_from_samples
from atso_fast.package.spec import check_preprocessing
from atso_fast.progress import progress_lines
from atso_fast.train.data import (
    RawCase,
    case_labels,
    locate_foreground,
    read_case,
    resolve_normalization,
    training_spacing,
)

__all__ = ["CachedCase", "Cache", "SPLITS", "build_cache", "save_npy", "fg_counts_of", "entry_case_id"]

log = logging.getLogger(__name__)

SPLITS = {"labelled": "Tr", "unlabelled": "Un", "val": "Val"}
_VERSION = 1
_CT_SAMPLES = 100_000  # foreground voxels per labelled case for the CT statistics


@dataclass
class CachedCase:
    """One cached case: files on disk, shape ``(Z, Y, X)`` of the network grid, and the number of
    foreground locations of each class in ``fg`` (stored one class after the other)."""

    case_id: str
    image: Path
    label: Path | None
    fg: Path | None
    shape: tuple[int, ...]  # (Z, Y, X)
    fg_counts: dict[int, int] = field(default_factory=dict)

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class Cache:
    """The cache of one run: cases per split, the resolved normalisation policy and spacing."""

    root: Path
    cases: dict[str, list[CachedCase]]
    normalization: dict[str, Any]
    spacing: list[float] | None
    preprocessing: dict[str, Any]
    spec_sha256: str
    built: int = 0  # cases preprocessed by this call (0: all reused)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, problem) of unlabelled cases left out


def save_npy(path: Path, array: np.ndarray) -> Path:
    """``np.save`` to a temp file beside ``path``, then fsync and rename (no copy in memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    return commit_temp(tmp, path)


def fg_counts_of(meta: dict[str, Any]) -> dict[int, int]:
    return {int(k): int(v) for k, v in meta["fg_counts"].items()}


def _identity(paths: Sequence[Path]) -> list[list[Any]]:
    """What says an input is unchanged: absolute path, size and modification time (ns)."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
        except OSError:  # reading it will fail with a message naming it
            out.append([os.path.abspath(p), None, None])
    return out


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def entry_case_id(entry: dict[str, Any]) -> str:
    """A listing entry's case id: its first image's file name without suffix and ``_0000``."""
    return case_id(Path(str(entry["image"][0])), None)


def _entries(listing: dict[str, Any], base: Path) -> dict[str, list[dict[str, Any]]]:
    """Normalised entries ``{"image": [abs paths], "label": abs path | None}`` per split."""
    out = {}
    for key in SPLITS:
        items = []
        for e in listing.get(key) or []:
            e = e if isinstance(e, dict) else {"image": e}
            if "image" not in e:
                raise ValueError(f"list entry needs an 'image' key, got {e!r}")
            imgs = e["image"] if isinstance(e["image"], (list, tuple)) else [e["image"]]
            items.append(
                {
                    "image": [str(base / str(p)) for p in imgs],
                    "label": str(base / str(e["label"])) if e.get("label") else None,
                }
            )
        ids = [entry_case_id(e) for e in items]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(
                f"data {key} cases share case ids {dup[:5]} (case ids are file names without the "
                "image suffix and _0000): rename them"
            )
        out[key] = items
    return out


def _read_case(
    entry: dict[str, Any], in_channels: int, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray | None, Any]:
    """``(image (M, Z, Y, X) float32, label (Z, Y, X) or None, meta of the first channel)``
    (:func:`~atso_fast.train.data.read_case`; entries hold their full paths), NaN-free."""
    image, label, meta = read_case(entry, Path("."), in_channels, num_classes)
    image = np.asarray(image, np.float32)
    if not np.isfinite(image).all():
        raise ValueError(f"{entry['image'][0]}: the image holds NaN or infinite voxels")
    return image, label, meta


def _ct_samples(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Up to ``_CT_SAMPLES`` evenly strided foreground intensities of the first channel."""
    values = image[0][label > 0]
    values = values if values.size else image[0].ravel()
    return values[:: max(1, values.size // _CT_SAMPLES)].astype(np.float32)


def _resolve(
    request: dict[str, Any],
    entries: dict[str, list[dict[str, Any]]],
    modality: str | None,
    in_channels: int,
    progress: Any,
) -> tuple[dict[str, Any], list[float] | None]:
    """The normalisation policy and target spacing, reading labelled cases only when needed
    (CT statistics from their foreground, or their median spacing when the config has none)."""

    spec = request["normalization"]
    is_ct = spec == "ct" or (spec in (None, "auto") and (modality or "").upper() == "CT")
    need_spacing = request["spacing"] is None
    samples, spacings = [], []
    if is_ct or need_spacing:
        for e in _bar(entries["labelled"], progress, "cache: labelled statistics"):
            image, label, meta = _read_case(e, in_channels)
            spacings.append(RawCase(image[:, :0], None, e["image"][0], meta.spacing))
            if is_ct:
                if label is None:  # build_cache refuses labelled entries without a label first
                    raise ValueError(f"{e['image'][0]}: a labelled case without a label")
                values = _ct_samples(image, label)
                samples.append(RawCase(values[None, None, None], np.ones((1, 1, values.size), np.uint8)))
            del image, label
    if is_ct:  # never with a policy dict
        policy = ct_policy_from_samples([c.image[0] for c in samples], case_labels(samples, "labelled"))
    else:  # a policy dict is checked there
        policy = resolve_normalization(spec, [], modality)
    spacing = request["spacing"] if not need_spacing else training_spacing(spacings)
    return policy, (None if spacing is None else [float(s) for s in spacing])


def _bar(items: Sequence[Any], progress: Any, desc: str) -> Any:
    """A tqdm bar on a terminal, lines every 10 s elsewhere (``progress=None``), or nothing."""
    if progress is False or not items:
        return items
    if progress is None and not getattr(sys.stderr, "isatty", lambda: False)():
        return progress_lines(items, desc, len(items))
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True)


def _package(spec: dict[str, Any]) -> ModelPackage:
    """A file-less package carrying the spec, for :func:`prepare`."""
    return ModelPackage(
        None,
        tuple(spec["window"]),
        spec["in_channels"],
        spec["num_classes"],
        "logits",
        spec["normalization"],
        spec["spacing"],
        onnx_file=None,
        preprocessing=spec["preprocessing"],
    )


def _label_to_grid(label: np.ndarray, geom: Any) -> np.ndarray:
    """A label map through the scan's geometry (orientation, crop) and nearest resampling."""
    lab = np.ascontiguousarray(geom.to_net(label))
    if tuple(geom.target) != tuple(lab.shape):
        idx = [axis_op(n, m, 0).idx0 for n, m in zip(lab.shape, geom.target)]
        lab = lab[np.ix_(*idx)]
    return np.ascontiguousarray(lab, np.uint8)


def _build_case(
    entry: dict[str, Any], cid: str, folder: Path, spec: dict[str, Any], spec_sha: str, identity: list[list[Any]]
) -> CachedCase:
    image, label, meta = _read_case(entry, spec["in_channels"], spec["num_classes"])
    vol, geom = prepare(image, _package(spec), spacing=meta.spacing, affine=meta.affine)
    del image
    paths = _paths(folder, cid)
    save_npy(paths["images"], vol)
    fg_counts: dict[int, int] = {}
    if label is not None:
        label = _label_to_grid(label, geom)
        if label.shape != vol.shape[1:]:
            raise ValueError(f"{entry['label']}: label grid {label.shape} differs from image grid {vol.shape[1:]}")
        save_npy(paths["labels"], label)
        fg, fg_counts = locate_foreground(label, spec["num_classes"], spec["max_locations"])
        save_npy(paths["fg"], fg)
    record = {
        "case_id": cid,
        "inputs": identity,
        "spec_sha256": spec_sha,
        "shape": list(vol.shape[1:]),
        "has_label": label is not None,
        "fg_counts": {str(k): v for k, v in fg_counts.items()},
        "spacing": None if meta.spacing is None else [float(s) for s in meta.spacing],
    }
    paths["meta"].parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(paths["meta"], json.dumps(record).encode())  # last: marks the case complete
    return _cached(cid, paths, record)


def _paths(folder: Path, cid: str) -> dict[str, Path]:
    return {
        kind: folder / kind / f"{cid}.{'json' if kind == 'meta' else 'npy'}"
        for kind in ("images", "labels", "fg", "meta")
    }


def _cached(cid: str, paths: dict[str, Path], record: dict[str, Any]) -> CachedCase:
    has = record["has_label"]
    return CachedCase(
        cid,
        paths["images"],
        paths["labels"] if has else None,
        paths["fg"] if has else None,
        tuple(int(s) for s in record["shape"]),
        fg_counts_of(record),
    )


def _reusable(paths: dict[str, Path], identity: list[list[Any]], spec_sha: str) -> dict[str, Any] | None:
    try:
        record = json.loads(paths["meta"].read_text())
    except (OSError, ValueError):
        return None
    if record.get("inputs") != identity or record.get("spec_sha256") != spec_sha:
        return None
    needed = [paths["images"]] + ([paths["labels"], paths["fg"]] if record.get("has_label") else [])
    return record if all(p.is_file() for p in needed) else None


def build_cache(
    listing: dict[str, Any],
    base: Path,
    root: str | os.PathLike[str],
    *,
    window: Sequence[int],
    in_channels: int,
    num_classes: int,
    normalization: str | dict[str, Any] | None,
    spacing: Sequence[float] | None,
    preprocessing: dict[str, Any] | None = None,
    max_locations: int = 10000,
    progress: bool | None = None,
) -> Cache:
    """Preprocess every case of ``listing`` into ``root`` once; reuse what is already there.

    Args:
        listing: ``{"labelled": [...], "unlabelled": [...], "val": [...], "modality": ...}`` in
            list-file form (see :mod:`atso_fast.train.data`); paths relative to ``base``.
        base: folder the listing's paths are relative to.
        root: the cache folder (created).
        window: the network's patch size (recorded in the spec).
        in_channels, num_classes: M and C.
        normalization: policy dict or ``"auto"``/``"ct"``/``"zscore"``/``"none"``.
        spacing: target spacing ``(z, y, x)`` mm; None: the labelled cases' median spacing when
            they agree within 20% (else each case keeps its own grid).
        preprocessing: the package preprocessing spec (``atso_fast.package.spec``).
        max_locations: foreground locations kept per class and case.
        progress: tqdm bar on stderr (None: only on a terminal).

    Returns:
        the :class:`Cache`.

    Raises:
        ValueError: a bad listing, unreadable or inconsistent case (naming the file), no
            labelled case, a labelled or validation case without a label.
    """
    root = Path(root)
    entries = _entries(listing, base)
    if not entries["labelled"]:
        raise ValueError("data: no labelled case found")
    for key in ("labelled", "val"):
        missing = [e["image"][0] for e in entries[key] if not e["label"]]
        if missing:
            raise ValueError(f"data: {key} cases without a label: {missing[:5]}")
    prep = check_preprocessing(preprocessing or {}, len(window), "ATSOConfig.preprocessing")
    identities = {
        key: [_identity(e["image"] + ([e["label"]] if e["label"] else [])) for e in items]
        for key, items in entries.items()
    }
    request = {
        "version": _VERSION,
        "normalization": normalization,
        "modality": listing.get("modality"),
        "spacing": None if spacing is None else [float(s) for s in spacing],
        "labelled_inputs": identities["labelled"],
    }
    policy, target = _plan(root, request, entries, in_channels, progress)
    spec = {
        "version": _VERSION,
        "window": [int(w) for w in window],
        "in_channels": int(in_channels),
        "num_classes": int(num_classes),
        "normalization": policy,
        "spacing": target,
        "preprocessing": prep,
        "max_locations": int(max_locations),
    }
    cache = Cache(root, {}, policy, target, prep, _sha(spec))
    for key, items in entries.items():
        cache.cases[key] = [
            case
            for entry, identity in zip(_bar(items, progress, f"cache: {key}"), identities[key])
            if (case := _cache_one(cache, key, entry, identity, spec)) is not None
        ]
    return cache


def _cache_one(
    cache: Cache, key: str, entry: dict[str, Any], identity: list[list[Any]], spec: dict[str, Any]
) -> CachedCase | None:
    """Reuse or build one case. A bad unlabelled case is left out (recorded in ``cache.failed``
    and logged): one scan must not stop an archive; a bad labelled or validation case is an error."""
    folder, cid = cache.root / SPLITS[key], entry_case_id(entry)
    record = _reusable(_paths(folder, cid), identity, cache.spec_sha256)
    if record is not None:
        return _cached(cid, _paths(folder, cid), record)
    try:
        case = _build_case(entry, cid, folder, spec, cache.spec_sha256, identity)
    except (ValueError, OSError) as exc:  # InputError is a ValueError
        if key != "unlabelled":
            raise
        message = " ".join(str(exc).split())
        cache.failed.append((entry["image"][0], message))
        log.warning("cache: unlabelled case %s left out: %s", cid, message)
        return None
    cache.built += 1
    return case


def _plan(
    root: Path, request: dict[str, Any], entries: dict[str, list[dict[str, Any]]], in_channels: int, progress: Any
) -> tuple[dict[str, Any], list[float] | None]:
    """The resolved policy and spacing: from ``plan.json`` when the request is unchanged."""
    plan_file, key = root / "plan.json", _sha(request)
    try:
        plan = json.loads(plan_file.read_text())
        if plan.get("request_sha256") == key:
            policy = check_policy(plan["normalization"])
            if isinstance(policy, dict):  # what _resolve writes; anything else: a damaged plan, resolved again
                return policy, plan["spacing"]
    except (OSError, ValueError, KeyError):
        pass
    policy, target = _resolve(request, entries, request["modality"], in_channels, progress)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(
        plan_file, json.dumps({"request_sha256": key, "normalization": policy, "spacing": target}, indent=1).encode()
    )
    return policy, target
