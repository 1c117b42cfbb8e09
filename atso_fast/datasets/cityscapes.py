"""Cityscapes: the official label table, labelId <-> trainId maps, and the folder layouts.

The table is cityscapesScripts' ``helpers/labels.py`` (``mcordts/cityscapesScripts``): 34 labels
with ids 0-33 plus ``license plate`` (id -1), 19 of them evaluated (trainIds 0-18), every other
label trainId 255 (ignored). Ground truth PNGs store labelIds (``*_gtFine_labelIds.png``);
networks are trained on trainIds; results go to the evaluation server as labelIds. The inverse
map takes, for each trainId, the first label of the table that has it (as cityscapesScripts'
``trainId2label``): trainId 255 -> labelId 0 (``unlabeled``).

Layouts (file names are only listed here, never opened):
    Cityscapes: ``ROOT/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png`` with
    ``ROOT/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png``;
    plain: ``ROOT/images/**/NAME.{png,jpg,jpeg}`` with ``ROOT/labels/**/NAME.png`` (same
    relative path, labels in trainIds unless the caller says otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from atso_fast.io import InputError, read_volume

__all__ = [
    "IGNORE_INDEX",
    "LABELS",
    "NUM_CLASSES",
    "TRAIN_NAMES",
    "Frame",
    "Label",
    "cityscapes_frames",
    "is_cityscapes_split",
    "label_id_colors",
    "label_ids_to_train_ids",
    "load_frame",
    "plain_frames",
    "train_id_colors",
    "train_ids_to_label_ids",
    "train_to_label_map",
]

IGNORE_INDEX = 255
"""trainId of every label that is not evaluated (and of pixels a network is unsure about)."""
NUM_CLASSES = 19
"""Evaluated classes (trainIds 0-18)."""

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
_PICTURES = (".png", ".jpg", ".jpeg")


class Label(NamedTuple):
    """One row of the official table (cityscapesScripts' ``Label``, snake_case names)."""

    name: str
    id: int
    train_id: int
    category: str
    category_id: int
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


LABELS: tuple[Label, ...] = (
    #     name                    id  trainId category       catId inst   ignore color
    Label("unlabeled", 0, 255, "void", 0, False, True, (0, 0, 0)),
    Label("ego vehicle", 1, 255, "void", 0, False, True, (0, 0, 0)),
    Label("rectification border", 2, 255, "void", 0, False, True, (0, 0, 0)),
    Label("out of roi", 3, 255, "void", 0, False, True, (0, 0, 0)),
    Label("static", 4, 255, "void", 0, False, True, (0, 0, 0)),
    Label("dynamic", 5, 255, "void", 0, False, True, (111, 74, 0)),
    Label("ground", 6, 255, "void", 0, False, True, (81, 0, 81)),
    Label("road", 7, 0, "flat", 1, False, False, (128, 64, 128)),
    Label("sidewalk", 8, 1, "flat", 1, False, False, (244, 35, 232)),
    Label("parking", 9, 255, "flat", 1, False, True, (250, 170, 160)),
    Label("rail track", 10, 255, "flat", 1, False, True, (230, 150, 140)),
    Label("building", 11, 2, "construction", 2, False, False, (70, 70, 70)),
    Label("wall", 12, 3, "construction", 2, False, False, (102, 102, 156)),
    Label("fence", 13, 4, "construction", 2, False, False, (190, 153, 153)),
    Label("guard rail", 14, 255, "construction", 2, False, True, (180, 165, 180)),
    Label("bridge", 15, 255, "construction", 2, False, True, (150, 100, 100)),
    Label("tunnel", 16, 255, "construction", 2, False, True, (150, 120, 90)),
    Label("pole", 17, 5, "object", 3, False, False, (153, 153, 153)),
    Label("polegroup", 18, 255, "object", 3, False, True, (153, 153, 153)),
    Label("traffic light", 19, 6, "object", 3, False, False, (250, 170, 30)),
    Label("traffic sign", 20, 7, "object", 3, False, False, (220, 220, 0)),
    Label("vegetation", 21, 8, "nature", 4, False, False, (107, 142, 35)),
    Label("terrain", 22, 9, "nature", 4, False, False, (152, 251, 152)),
    Label("sky", 23, 10, "sky", 5, False, False, (70, 130, 180)),
    Label("person", 24, 11, "human", 6, True, False, (220, 20, 60)),
    Label("rider", 25, 12, "human", 6, True, False, (255, 0, 0)),
    Label("car", 26, 13, "vehicle", 7, True, False, (0, 0, 142)),
    Label("truck", 27, 14, "vehicle", 7, True, False, (0, 0, 70)),
    Label("bus", 28, 15, "vehicle", 7, True, False, (0, 60, 100)),
    Label("caravan", 29, 255, "vehicle", 7, True, True, (0, 0, 90)),
    Label("trailer", 30, 255, "vehicle", 7, True, True, (0, 0, 110)),
    Label("train", 31, 16, "vehicle", 7, True, False, (0, 80, 100)),
    Label("motorcycle", 32, 17, "vehicle", 7, True, False, (0, 0, 230)),
    Label("bicycle", 33, 18, "vehicle", 7, True, False, (119, 11, 32)),
    Label("license plate", -1, -1, "vehicle", 7, False, True, (0, 0, 142)),
)
"""The official table, in its order (the inverse map relies on it)."""

TRAIN_NAMES: tuple[str, ...] = tuple(next(lab.name for lab in LABELS if lab.train_id == k) for k in range(NUM_CLASSES))
"""Class names in trainId order (``road``, ``sidewalk``, ..., ``bicycle``)."""


def _id_to_train() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for lab in LABELS:
        if 0 <= lab.id < 256:
            lut[lab.id] = lab.train_id if 0 <= lab.train_id < NUM_CLASSES else IGNORE_INDEX
    return lut


def _train_to_id() -> np.ndarray:
    lut = np.zeros(256, np.int16) - 1  # -1: no label has this trainId
    for lab in reversed(LABELS):  # the first label of the table wins, as cityscapesScripts' trainId2label
        if 0 <= lab.train_id < 256 and lab.id >= 0:
            lut[lab.train_id] = lab.id
    return lut


_BY_ID = {lab.id: lab for lab in LABELS}
_ID_TO_TRAIN = _id_to_train()
_TRAIN_TO_ID = _train_to_id()


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """trainIds (uint8) of a labelId map: the 19 evaluated labels to 0-18, everything else
    (void labels, ``license plate`` -1, ids the table does not have) to 255.

    Raises:
        ValueError: a non-integer array.
    """
    ids = np.asarray(label_ids)
    if ids.dtype.kind not in "iub":
        raise ValueError(f"label ids must be an integer array, got {ids.dtype}")
    if ids.dtype == np.uint8:
        return _ID_TO_TRAIN[ids]
    inside = (ids >= 0) & (ids < 256)
    return np.where(inside, _ID_TO_TRAIN[np.where(inside, ids, 0)], np.uint8(IGNORE_INDEX)).astype(np.uint8)


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """labelIds (uint8) of a trainId map (the first label with each trainId; 255 -> 0, ``unlabeled``).

    Raises:
        ValueError: a non-integer array, or a value that is no trainId (19-254, negative).
    """
    train = np.asarray(train_ids)
    if train.dtype.kind not in "iub":
        raise ValueError(f"train ids must be an integer array, got {train.dtype}")
    inside = (train >= 0) & (train < 256)
    ids = _TRAIN_TO_ID[np.where(inside, train, 0)]
    bad = ~inside | (ids < 0)
    if bad.any():
        values = np.unique(np.asarray(train)[bad])[:5].tolist()
        raise ValueError(f"values {values} are not Cityscapes trainIds (0-{NUM_CLASSES - 1} or {IGNORE_INDEX})")
    return ids.astype(np.uint8)


def train_to_label_map() -> dict[int, int]:
    """``{trainId: labelId}`` for the 19 classes and the ignore index (255 -> 0): the map that turns
    a network's trainId output into labelIds (``Relabeler(label_map=...)``)."""
    return {k: int(_TRAIN_TO_ID[k]) for k in (*range(NUM_CLASSES), IGNORE_INDEX)}


def train_id_colors() -> np.ndarray:
    """``(256, 3)`` uint8 colours indexed by trainId (the official colours; 255 and unused: black)."""
    table = np.zeros((256, 3), np.uint8)
    for k in range(NUM_CLASSES):
        table[k] = _BY_ID[int(_TRAIN_TO_ID[k])].color
    return table


def label_id_colors() -> np.ndarray:
    """``(256, 3)`` uint8 colours indexed by labelId (the official colours; unused ids black)."""
    table = np.zeros((256, 3), np.uint8)
    for lab in LABELS:
        if lab.id >= 0:
            table[lab.id] = lab.color
    return table


# ------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class Frame:
    """One frame of a layout: ``image`` (colour picture), ``label`` (or None), and names.

    Attributes:
        name: the frame's id (``frankfurt_000000_000294``; the plain layout: the path relative to
            ``images/`` without suffix).
        city: the Cityscapes city folder (``""`` in the plain layout).
        label_kind: ``"label_ids"`` (Cityscapes gtFine) or ``"train_ids"`` (plain layout default).
    """

    name: str
    image: Path
    label: Path | None
    city: str = ""
    label_kind: str = "label_ids"


def is_cityscapes_split(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a Cityscapes image folder whose frames lie in city sub-folders:
    ``.../leftImg8bit/{split}`` or ``.../leftImg8bit`` itself."""
    path = Path(os.path.abspath(path))
    return path.is_dir() and (path.name == "leftImg8bit" or path.parent.name == "leftImg8bit")


def _walk(folder: Path, keep: Sequence[str]) -> list[Path]:
    """Files under ``folder`` whose names end with one of ``keep`` (case-insensitive), sorted;
    hidden entries and linked folders are left out, nothing is opened."""
    found, endings = [], tuple(k.lower() for k in keep)
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not os.path.islink(os.path.join(here, d)))
        found += [Path(here) / f for f in files if not f.startswith(".") and f.lower().endswith(endings)]
    return sorted(found)


def _unpaired(kind: str, paths: Iterable[Path], expected: Iterable[Path]) -> str:
    pairs = [f"{p} (expected {e})" for p, e in zip(paths, expected)]
    more = f" and {len(pairs) - 3} more" if len(pairs) > 3 else ""
    return f"{kind}: {'; '.join(pairs[:3])}{more}"


def cityscapes_frames(root: str | os.PathLike[str], split: str = "train", *, labels: bool = True) -> list[Frame]:
    """The frames of ``ROOT/leftImg8bit/{split}``, each paired with its ``gtFine`` labelIds PNG.

    Args:
        root: the dataset folder (holding ``leftImg8bit/`` and ``gtFine/``).
        split: ``train``, ``val``, ``test`` or any folder name there.
        labels: pair with ground truth (every frame must have one and every label a frame);
            ``False``: images only (``label`` None).

    Raises:
        InputError: the split folder is missing or empty, or frames and labels do not pair up
            (naming the files and the file expected beside each).
    """
    root = Path(root)
    images_dir, labels_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    if not images_dir.is_dir():
        raise InputError(
            f"{images_dir}: no such folder (Cityscapes layout: ROOT/leftImg8bit/{split}/CITY/*{IMAGE_SUFFIX})"
        )
    images = [p for p in _walk(images_dir, [IMAGE_SUFFIX]) if p.parent.parent == images_dir]
    if not images:
        raise InputError(f"{images_dir}: no frames (*{IMAGE_SUFFIX} in city sub-folders)")
    frames = []
    for image in images:
        stem = image.name[: -len(IMAGE_SUFFIX)]
        label = labels_dir / image.parent.name / (stem + LABEL_SUFFIX) if labels else None
        frames.append(Frame(stem, image, label, image.parent.name))
    if labels:
        _check_pairs(
            frames,
            labels_dir,
            LABEL_SUFFIX,
            lambda p: images_dir / p.parent.name / (p.name[: -len(LABEL_SUFFIX)] + IMAGE_SUFFIX),
        )
    return frames


def _check_pairs(frames: list[Frame], labels_dir: Path, suffix: str, image_of) -> None:
    """Every frame's label exists, and every label under ``labels_dir`` has its frame."""
    missing = [f for f in frames if f.label is not None and not f.label.is_file()]
    wanted = {os.path.abspath(f.label) for f in frames if f.label is not None}
    orphans = [
        p for p in (_walk(labels_dir, [suffix]) if labels_dir.is_dir() else []) if os.path.abspath(p) not in wanted
    ]
    problems = []
    if missing:
        problems.append(
            _unpaired(
                f"{len(missing)} frame(s) without a label",
                (f.image for f in missing),
                (f.label for f in missing),  # type: ignore[misc]
            )
        )
    if orphans:
        problems.append(_unpaired(f"{len(orphans)} label(s) without a frame", orphans, map(image_of, orphans)))
    if problems:
        raise InputError("; ".join(problems))


def plain_frames(root: str | os.PathLike[str], *, labels: bool = True, label_kind: str = "train_ids") -> list[Frame]:
    """The frames of ``ROOT/images/`` (PNG/JPEG, sub-folders too), each paired with the PNG of the
    same relative path and name under ``ROOT/labels/``.

    Args:
        label_kind: what the label PNGs hold, ``"train_ids"`` (default) or ``"label_ids"``.

    Raises:
        InputError: ``images/`` missing or empty, two images with one name (``a.png`` and
            ``a.jpg``), or frames and labels that do not pair up (naming the files).
        ValueError: an unknown ``label_kind``.
    """
    if label_kind not in ("train_ids", "label_ids"):
        raise ValueError(f"label_kind must be 'train_ids' or 'label_ids', got {label_kind!r}")
    root = Path(root)
    images_dir, labels_dir = root / "images", root / "labels"
    if not images_dir.is_dir():
        raise InputError(f"{images_dir}: no such folder (plain layout: ROOT/images/ and ROOT/labels/)")
    images = _walk(images_dir, _PICTURES)
    if not images:
        raise InputError(f"{images_dir}: no PNG/JPEG pictures")
    frames: list[Frame] = []
    owners: dict[str, Path] = {}
    for image in images:
        rel = image.relative_to(images_dir)
        name = rel.with_suffix("").as_posix()
        if name in owners:
            raise InputError(f"{owners[name]} and {image} are both frame {name!r}: one picture per name")
        owners[name] = image
        label = labels_dir / rel.with_suffix(".png") if labels else None
        frames.append(Frame(name, image, label, "", label_kind))
    if labels:
        _check_pairs(frames, labels_dir, ".png", lambda p: images_dir / p.relative_to(labels_dir).with_suffix(".png"))
    return frames


def load_frame(frame: Frame) -> tuple[np.ndarray, np.ndarray | None]:
    """``(rgb (3, H, W) uint8, train_ids (H, W) uint8 or None)`` of one frame, read through the
    format registry (untrusted-input rules); labelId PNGs are mapped to trainIds.

    Raises:
        InputError: an unreadable picture, a frame that is not colour, a label that is not one
            8-bit band or whose size differs from the frame's.
    """
    image, _ = read_volume(frame.image)
    if image.ndim != 4 or image.shape[0] != 3:
        bands = image.shape[0] if image.ndim == 4 else 1
        raise InputError(f"{frame.image}: expected an RGB frame, got {bands} band(s)")
    rgb = image[:, 0]
    if frame.label is None:
        return rgb, None
    label, _ = read_volume(frame.label)
    if label.ndim != 3 or label.dtype != np.uint8 or label.shape[1:] != rgb.shape[1:]:
        raise InputError(
            f"{frame.label}: expected one 8-bit band of {rgb.shape[1]} x {rgb.shape[2]} pixels "
            f"(the frame's size), got {label.shape} {label.dtype}"
        )
    ids = label[0]
    return rgb, label_ids_to_train_ids(ids) if frame.label_kind == "label_ids" else ids
