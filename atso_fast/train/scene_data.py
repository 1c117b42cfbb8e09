"""Driving scenes as training data: the Cityscapes form of ``config.data`` (issue 24).

``config.data`` names Cityscapes-layout folders (``ROOT/leftImg8bit/{split}/{city}/*_leftImg8bit.png``
with ``ROOT/gtFine/{split}/{city}/*_gtFine_labelIds.png``, :mod:`atso_fast.datasets.cityscapes`)::

    cityscapes:       ROOT       # required: the labelled set's dataset folder
    labelled:         train      # split of ROOT whose frames (with labels) are L (default "train")
    labelled_count:   N          # optional: N frames of that split, drawn by labelled_seed (default all)
    labelled_seed:    0          # seeds that draw (default 0); the drawn frames are kept in name order
    unlabelled:       train      # split whose frames are U (default none); the same split of the same
                                 #   root as labelled: its frames not drawn into L (semi-supervised)
    unlabelled_root:  ROOT_B     # folder of U (default ROOT); another dataset: the transfer setting
    val:              val        # split of the validation frames (default "val"; null: none)
    val_root:         ROOT_B     # folder of the validation frames (default ROOT)

Transfer (labelled on dataset A, adapted to and evaluated on B)::

    {cityscapes: A, labelled: train, unlabelled_root: B, unlabelled: train, val_root: B, val: val}

Every frame becomes a case: image ``(3, 1, H, W)`` (RGB 0-255; the store normalises it, by
default with ImageNet's statistics, the ``rgb`` scheme: the policy is the run's
``normalization`` and travels into exported packages), label ``(1, H, W)`` uint8 trainIds
(0-18, 255 ignored: the official labelId -> trainId map). Unlabelled frames keep their ground
truth when their split has a ``gtFine`` folder: hidden from training, read by the monitors
only (pseudo-label quality), as with phantoms. The three sets never share a frame.

Memory storage only: every frame is held in RAM as float32 (12 bytes per pixel: the generated
scenes, 128 x 256, take 0.4 MB; full-size Cityscapes frames, 1024 x 2048, 25 MB each, so 2975
of them 75 GB: train on downscaled copies or a subset).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from atso_fast.datasets.cityscapes import NUM_CLASSES as SCENE_CLASSES
from atso_fast.datasets.cityscapes import TRAIN_NAMES, Frame, cityscapes_frames, load_frame
from atso_fast.package.normalize import check_policy, normalize
from atso_fast.train.data import Case, RawCase

__all__ = [
    "SCENE_KEYS",
    "SCENE_MODALITY",
    "SCENE_CLASSES",
    "is_scene_spec",
    "check_scene_spec",
    "scene_frames",
    "load_scene_raw",
    "scene_cases",
    "scene_class_names",
]

SCENE_KEYS = (
    "cityscapes",
    "labelled",
    "labelled_count",
    "labelled_seed",
    "unlabelled",
    "unlabelled_root",
    "val",
    "val_root",
)
"""The keys of the Cityscapes data form (see the module docstring)."""
SCENE_MODALITY = "RGB"
"""The modality scene data report (``normalization: auto`` then means ImageNet's statistics)."""
_ROOT_KEYS = ("cityscapes", "unlabelled_root", "val_root")


def is_scene_spec(data: Any) -> bool:
    """Whether ``config.data`` is the Cityscapes form (a mapping with a ``cityscapes`` key)."""
    return isinstance(data, Mapping) and "cityscapes" in data


def check_scene_spec(data: Mapping[str, Any]) -> dict[str, Any]:
    """The Cityscapes data form with its defaults filled in (roots as strings, nothing read).

    Raises:
        ValueError: unknown keys, a missing or empty root, a split that is no folder name, a
            count below 1 or a seed that is no integer.
    """
    unknown = sorted(set(data) - set(SCENE_KEYS))
    if unknown:
        raise ValueError(f"the cityscapes data form takes the keys {list(SCENE_KEYS)}, got unknown {unknown}")
    spec = {
        "labelled": "train",
        "labelled_count": None,
        "labelled_seed": 0,
        "unlabelled": None,
        "unlabelled_root": None,
        "val": "val",
        "val_root": None,
        **data,
    }
    for key in _ROOT_KEYS:
        value = spec[key]
        if key == "cityscapes" or value is not None:
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise ValueError(f"data {key} must be a folder path, got {value!r}")
            spec[key] = os.fspath(value)
    spec["unlabelled_root"] = spec["unlabelled_root"] or spec["cityscapes"]
    spec["val_root"] = spec["val_root"] or spec["cityscapes"]
    for key in ("labelled", "unlabelled", "val"):
        value = spec[key]
        if (key == "labelled" or value is not None) and (
            not isinstance(value, str) or not value or "/" in value or value in (".", "..")
        ):
            raise ValueError(f"data {key} must be a split folder name (train, val, ...), got {value!r}")
    count, seed = spec["labelled_count"], spec["labelled_seed"]
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"data labelled_count must be an int >= 1 or null, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"data labelled_seed must be an int, got {seed!r}")
    return spec


def _same(root_a: str, root_b: str) -> bool:
    return os.path.abspath(root_a) == os.path.abspath(root_b)


def _optional_truth(root: str, split: str) -> list[Frame]:
    """The frames of a split, paired with their ground truth when the split has a ``gtFine`` folder."""
    return cityscapes_frames(root, split, labels=(Path(root) / "gtFine" / split).is_dir())


def scene_frames(data: Mapping[str, Any]) -> dict[str, list[Frame]]:
    """The frames of each set, ``{"labelled", "unlabelled", "val"}``, without reading a picture.

    Raises:
        ValueError: see :func:`check_scene_spec`; ``labelled_count`` above the split's frames;
            sets that share a frame. :class:`~atso_fast.io.InputError` (a ``ValueError``): a
            missing split, frames and labels that do not pair up.
    """
    spec = check_scene_spec(data)
    pool = cityscapes_frames(spec["cityscapes"], spec["labelled"])
    count = spec["labelled_count"]
    if count is not None and count > len(pool):
        raise ValueError(
            f"data labelled_count {count} exceeds the {len(pool)} frames of "
            f"{spec['cityscapes']}/leftImg8bit/{spec['labelled']}"
        )
    chosen = (
        range(len(pool))
        if count is None
        else sorted(np.random.default_rng(spec["labelled_seed"]).permutation(len(pool))[:count].tolist())
    )
    labelled = [pool[i] for i in chosen]
    unlabelled: list[Frame] = []
    if spec["unlabelled"] is not None:
        taken = {os.path.abspath(f.image) for f in labelled}
        if spec["unlabelled"] == spec["labelled"] and _same(spec["unlabelled_root"], spec["cityscapes"]):
            unlabelled = [f for f in pool if os.path.abspath(f.image) not in taken]
        else:
            unlabelled = _optional_truth(spec["unlabelled_root"], spec["unlabelled"])
    val = [] if spec["val"] is None else cityscapes_frames(spec["val_root"], spec["val"])
    _check_disjoint({"labelled": labelled, "unlabelled": unlabelled, "val": val})
    return {"labelled": labelled, "unlabelled": unlabelled, "val": val}


def _check_disjoint(sets: Mapping[str, Sequence[Frame]]) -> None:
    owner: dict[str, str] = {}
    for name, frames in sets.items():
        for frame in frames:
            path = os.path.abspath(frame.image)
            if owner.setdefault(path, name) != name:
                raise ValueError(
                    f"data: frame {frame.image} is in both the {owner[path]} and the {name} set; "
                    "they must not share frames"
                )


def _raw(frame: Frame) -> RawCase:
    rgb, train_ids = load_frame(frame)
    return RawCase(rgb[:, None], None if train_ids is None else train_ids[None], frame.name)


def load_scene_raw(data: Mapping[str, Any]) -> tuple[dict[str, list[RawCase]], str]:
    """Read every frame the Cityscapes form names (:func:`scene_frames`).

    Returns:
        ``({"labelled": [...], "unlabelled": [...], "val": [...]}, "RGB")``: images ``(3, 1, H, W)``
        uint8, labels ``(1, H, W)`` uint8 trainIds (unlabelled frames: their truth, or None).

    Raises:
        ValueError: see :func:`scene_frames`; no labelled frame; an unreadable picture.
    """
    frames = scene_frames(data)
    if not frames["labelled"]:
        raise ValueError(f"data {data.get('cityscapes')}: no labelled frame")
    return {key: [_raw(f) for f in found] for key, found in frames.items()}, SCENE_MODALITY


def scene_cases(root: str | os.PathLike[str], split: str, normalization: dict[str, Any]) -> list[Case]:
    """The labelled frames of ``ROOT/leftImg8bit/{split}`` as normalised cases (e.g. a test set
    evaluated with :meth:`atso_fast.train.atso.ATSO.evaluate`): image ``(3, 1, H, W)`` float32
    normalised with ``normalization`` (a run's ``config.normalization``), label ``(1, H, W)``.

    Raises:
        ValueError: a bad policy; see :func:`~atso_fast.datasets.cityscapes.cityscapes_frames`.
    """
    policy = check_policy(normalization)
    cases = []
    for frame in cityscapes_frames(root, split):
        raw = _raw(frame)
        cases.append(Case(normalize(raw.image, policy).astype(np.float32, copy=False), raw.label, raw.name))
    return cases


def scene_class_names(data: Any, num_classes: int) -> list[str] | None:
    """Cityscapes' 19 trainId names for the Cityscapes data form with 19 classes; else None."""
    return list(TRAIN_NAMES) if is_scene_spec(data) and num_classes == SCENE_CLASSES else None
