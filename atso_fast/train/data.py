"""Training data: loading (nnU-Net-style folders, YAML/JSON lists, in-memory arrays), intensity
normalisation, and the one patch sampler (foreground oversampling; arrays in memory or ``.npy``
files memory-mapped per patch).

Shapes: images are held as ``(M, Z, Y, X)`` float32 after normalisation (M = input channels),
labels as ``(Z, Y, X)`` uint8. A 2D model trains on ``(Y, X)`` slices of these volumes.

Folder layout (nnU-Net style; file names ``CASE_0000.ext`` per channel, labels ``CASE.ext``)::

    imagesTr/ labelsTr/      labelled cases
    imagesUn/                unlabelled cases (optional labelsUn/: truth, only for monitoring)
    imagesVal/ labelsVal/    validation cases (optional)
    dataset.json             optional; channel_names {"0": "CT"} selects the CT normalisation

List file (YAML or JSON; paths relative to the file)::

    labelled:   [{image: a.nii.gz, label: a_seg.nii.gz}, ...]   # image may be a list (channels)
    unlabelled: [b.nii.gz, {image: c.nii.gz, label: c_truth.nii.gz}, ...]
    val:        [{image: ..., label: ...}]
    modality:   CT                                              # optional

Driving scenes (issue 24): a dict naming Cityscapes-layout folders instead (memory storage only;
keys, defaults and the transfer setting in :mod:`atso_fast.train.scene_data`)::

    cityscapes:      ROOT          # required: dataset folder of the labelled frames
    labelled:        train         # split of ROOT (default train)
    labelled_count:  N             # optional: N frames of it (default all), drawn by
    labelled_seed:   0             #   this seed (default 0), kept in name order
    unlabelled:      train_extra   # split of unlabelled frames (default none); the labelled split
                                   #   itself: its frames not drawn into the labelled set
    unlabelled_root: ROOT_B        # optional (default ROOT): another dataset (transfer)
    val:             val           # validation split (default val; null: none)
    val_root:        ROOT_B        # optional (default ROOT)

Frames become cases with image ``(3, 1, H, W)`` (RGB, ``normalization: auto`` -> ImageNet's
statistics, the ``rgb`` scheme) and label ``(1, H, W)`` uint8 trainIds (255 ignored); such runs
need ``num_classes: 19``, ``in_channels: 3``, ``spatial_dims: 2``, ``ignore_index: 255``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import EllipsisType
from typing import Any, Protocol, cast

import numpy as np

from atso_fast.io import read_volume, supported_suffixes
from atso_fast.io.files import read_text_file
from atso_fast.package.normalize import IMAGENET_RGB, check_policy, ct_policy_from_samples, normalize

__all__ = [
    "low_confidence",
    "Case",
    "SemiSupervisedData",
    "RawCase",
    "load_raw",
    "prepare_data",
    "data_from_arrays",
    "resolve_normalization",
    "PatchSampler",
    "PatchCase",
    "Sampler",
    "open_array",
    "locate_foreground",
    "crop_with_padding",
    "training_spacing",
    "read_listing",
    "parse_listing_text",
    "check_label",
    "dataset_class_names",
    "read_case",
    "case_labels",
    "Threshold",
    "Source",
    "view_array",
]

_IMAGE_SUFFIXES = supported_suffixes()  # NIfTI, NumPy, NRRD, MetaImage (atso_fast.io's formats)


@dataclass
class RawCase:
    """One case as read: ``image`` ``(M, Z, Y, X)`` (any real dtype), ``label`` ``(Z, Y, X)`` or None,
    ``spacing`` ``(z, y, x)`` mm when the file records one."""

    image: np.ndarray
    label: np.ndarray | None = None
    name: str = ""
    spacing: tuple[float, float, float] | None = None


@dataclass
class Case:
    """One normalised case: ``image`` ``(M, Z, Y, X)`` float32, ``label`` ``(Z, Y, X)`` uint8 or None."""

    image: np.ndarray
    label: np.ndarray | None = None
    name: str = ""

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape[1:])


@dataclass
class SemiSupervisedData:
    """Labelled, unlabelled and validation cases, normalised with ``normalization``.

    ``unlabelled[i].label`` is the hidden truth when known: it is used only for monitoring
    pseudo-label quality, never for training.
    """

    labelled: list[Case]
    unlabelled: list[Case]
    val: list[Case] = field(default_factory=list)
    normalization: dict[str, Any] = field(default_factory=lambda: {"scheme": "none"})
    modality: str | None = None
    spacing: list[float] | None = None  # the labelled cases' spacing (training_spacing)


def case_labels(cases: Sequence[Case | RawCase], what: str) -> list[np.ndarray]:
    """The labels of cases that must have one (labelled and validation cases, truths asked for).

    Raises:
        ValueError: a case without a label (named, with ``what``: e.g. ``"labelled"``).
    """
    labels = []
    for i, case in enumerate(cases):
        if case.label is None:
            raise ValueError(f"{what} case {case.name or i!r} has no label")
        labels.append(case.label)
    return labels


def _as_channels(image: np.ndarray, in_channels: int, what: str) -> np.ndarray:
    """``(Z, Y, X)`` -> ``(1, Z, Y, X)``; ``(M, Z, Y, X)`` kept; anything else is an error."""
    image = np.asarray(image)
    if image.ndim == 3 and in_channels == 1:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != in_channels:
        raise ValueError(f"{what}: expected (Z, Y, X) or ({in_channels}, Z, Y, X), got shape {image.shape}")
    return image


def check_label(
    label: np.ndarray | None, image: np.ndarray, what: str, num_classes: int | None = None, ignore_index: int = 255
) -> np.ndarray | None:
    """``label`` as ``(Z, Y, X)`` uint8 on ``image``'s grid, every value a class or the ignore label.

    Args:
        what: the label file, named in every error.
        num_classes: the model's classes (values ``0 .. num_classes - 1``); ``None``: any
            value in ``[0, 255]``.
        ignore_index: the one other value allowed (voxels the loss skips).

    Raises:
        ValueError: another shape, or values that are no class, with the values and counts.
    """
    if label is None:
        return None
    label = np.asarray(label)
    if label.ndim == 4 and label.shape[0] == 1:
        label = label[0]
    if label.shape != image.shape[1:]:
        raise ValueError(f"{what}: label shape {label.shape} differs from image spatial shape {image.shape[1:]}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"{what}: labels must be in [0, 255], got [{label.min()}, {label.max()}]")
    label = label.astype(np.uint8)
    if num_classes is not None:
        values, counts = np.unique(label, return_counts=True)
        bad = [(int(v), int(c)) for v, c in zip(values, counts) if v >= num_classes and v != ignore_index]
        if bad:
            shown = ", ".join(f"{v} ({c} voxels)" for v, c in bad[:5])
            raise ValueError(
                f"{what}: label value(s) {shown} are not classes of this model (num_classes "
                f"{num_classes}: 0..{num_classes - 1}, ignore label {ignore_index}); fix the labels or "
                "num_classes"
            )
    return label


def _read(path: Path) -> np.ndarray:

    return read_volume(path)[0]


def read_case(
    entry: Any, base: Path, in_channels: int, num_classes: int | None = None, ignore_index: int = 255
) -> tuple[np.ndarray, np.ndarray | None, Any]:
    """``(image (M, Z, Y, X), label (Z, Y, X) uint8 or None, meta of the first channel)`` of a
    list-file entry: a path, a list of channel paths, or ``{"image": ..., "label": ...}``;
    labels are checked against ``num_classes`` (:func:`check_label`)."""
    if not isinstance(entry, dict):
        entry = {"image": entry}
    if "image" not in entry:
        raise ValueError(f"list entry needs an 'image' key, got {entry!r}")
    paths = entry["image"] if isinstance(entry["image"], (list, tuple)) else [entry["image"]]
    read = [read_volume(base / str(p)) for p in paths]
    chans = [array for array, _ in read]
    image = chans[0] if len(chans) == 1 else np.stack(chans)
    image = _as_channels(image, in_channels, str(base / str(paths[0])))
    label = None
    if entry.get("label"):
        label_path = base / str(entry["label"])
        label = check_label(_read(label_path), image, str(label_path), num_classes, ignore_index)
    return image, label, read[0][1]


def _read_entry(entry: Any, base: Path, in_channels: int, num_classes: int | None, ignore_index: int) -> RawCase:
    image, label, meta = read_case(entry, base, in_channels, num_classes, ignore_index)
    return RawCase(image, label, Path(meta.path).name, meta.spacing)


def training_spacing(cases: Sequence[RawCase]) -> list[float] | None:
    """The spacing a model trained on ``cases`` (at their own resolution) learnt: their median
    spacing, when every case records one within 20% of it on each axis; else None."""
    spacings = [c.spacing for c in cases]
    if not spacings or any(s is None for s in spacings):
        return None
    median = np.median(np.asarray(spacings, np.float64), axis=0)
    ratios = np.asarray(spacings, np.float64) / median
    if np.any(ratios > 1.2) or np.any(ratios < 1 / 1.2):
        return None
    return [float(m) for m in median]


def dataset_class_names(data: Any, num_classes: int) -> list[str] | None:
    """Class names from a data folder's nnU-Net ``dataset.json`` (``labels``: name -> value),
    when its values are exactly ``0 .. num_classes - 1``; else ``None``."""
    if not isinstance(data, (str, os.PathLike)) or not os.path.isdir(data):
        return None
    meta_file = Path(data) / "dataset.json"
    if not os.path.lexists(meta_file):
        return None
    labels = parse_listing_text(read_text_file(meta_file), meta_file).get("labels")
    if not isinstance(labels, dict):
        return None
    by_value = {v: str(k) for k, v in labels.items() if isinstance(v, int) and not isinstance(v, bool)}
    return [by_value[i] for i in range(num_classes)] if sorted(by_value) == list(range(num_classes)) else None


def _strip_suffix(name: str) -> str:
    return next((name[: -len(s)] for s in _IMAGE_SUFFIXES if name.lower().endswith(s)), name)


def _folder_entries(root: Path, images: str, labels: str) -> list[dict[str, Any]]:
    """Group ``images/CASE_XXXX.ext`` files by case and pair them with ``labels/CASE.ext``."""
    folder = root / images
    if not folder.is_dir():
        return []
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        stem = _strip_suffix(path.name)
        if stem == path.name or len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
            continue
        groups.setdefault(stem[:-5], []).append(path)
    entries = []
    for case, paths in sorted(groups.items()):
        label = next((p for p in sorted((root / labels).glob(case + ".*")) if _strip_suffix(p.name) == case), None)
        entries.append({"image": [str(p) for p in paths], "label": str(label) if label else None})
    return entries


def parse_listing_text(text: str, path: Path) -> Any:
    """A JSON (``.json``) or YAML document read from ``path``; a syntax error names the file."""
    import yaml

    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(
            f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} "
            f"({str(exc).splitlines()[0][:200]})"
        ) from None


def _load_spec(spec: str | Path | dict[str, Any]) -> tuple[dict[str, Any], Path]:
    if isinstance(spec, dict):
        return spec, Path(".")
    path = Path(spec)
    if path.is_dir():
        listing: dict[str, Any] = {
            key: _folder_entries(path, f"images{sfx}", f"labels{sfx}")
            for key, sfx in (("labelled", "Tr"), ("unlabelled", "Un"), ("val", "Val"))
        }
        meta_file = path / "dataset.json"
        if os.path.lexists(meta_file):
            channels = parse_listing_text(read_text_file(meta_file), meta_file).get("channel_names", {})
            listing["modality"] = channels.get("0") if isinstance(channels, dict) else None
        return listing, Path(".")
    if not os.path.lexists(path):
        raise ValueError(f"data must be a folder, a .yaml/.json list or a dict, got {spec!s} (not found)")
    listing = parse_listing_text(read_text_file(path), path)
    if not isinstance(listing, dict):
        raise ValueError(f"{path}: expected a mapping with labelled/unlabelled/val lists, got {type(listing).__name__}")
    return listing, path.parent


def read_listing(spec: str | Path | dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """The cases a folder, list file or dict names, without reading any image.

    Returns:
        ``(listing in list-file form, folder its paths are relative to)``.

    Raises:
        ValueError: missing folder/file, not a mapping, unknown keys.
    """
    listing, base = _load_spec(spec)
    unknown = set(listing) - {"labelled", "unlabelled", "val", "modality"}
    if unknown:
        raise ValueError(f"data listing has unknown keys {sorted(unknown)}")
    return listing, base


def load_raw(
    spec: str | Path | dict[str, Any], *, in_channels: int = 1, num_classes: int | None = None, ignore_index: int = 255
) -> tuple[dict[str, list[RawCase]], str | None]:
    """Read every case named by a folder, a list file, or a dict in list-file form.

    Returns:
        ``({"labelled": [...], "unlabelled": [...], "val": [...]}, modality or None)``.

    Raises:
        ValueError: missing folder/file, no labelled case, a labelled/val case without a label.
    """
    listing, base = _load_spec(spec)
    unknown = set(listing) - {"labelled", "unlabelled", "val", "modality"}
    if unknown:
        raise ValueError(f"data listing has unknown keys {sorted(unknown)}")
    out = {
        key: [_read_entry(e, base, in_channels, num_classes, ignore_index) for e in (listing.get(key) or [])]
        for key in ("labelled", "unlabelled", "val")
    }
    if not out["labelled"]:
        raise ValueError(f"data {spec!s}: no labelled case found")
    for key in ("labelled", "val"):
        missing = [c.name for c in out[key] if c.label is None]
        if missing:
            raise ValueError(f"data {spec!s}: {key} cases without a label: {missing[:5]}")
    return out, listing.get("modality")


def resolve_normalization(
    spec: str | dict[str, Any] | None, labelled: Sequence[RawCase], modality: str | None = None
) -> dict[str, Any]:
    """Turn a normalisation spec into a full policy (``atso_fast.package.normalize``).

    Args:
        spec: a policy dict, or ``"ct"`` (statistics of the labelled foreground), ``"zscore"``,
            ``"none"``, ``"imagenet"`` (:data:`~atso_fast.package.normalize.IMAGENET_RGB`: the
            ``rgb`` scheme with ImageNet's per-channel statistics on 0-255 pictures), or
            ``"auto"``/``None`` (``"ct"`` when ``modality`` is CT, ``"imagenet"`` when it is RGB,
            else ``"zscore"``).
        labelled: raw labelled cases, for the CT statistics (first channel).
        modality: e.g. ``"CT"`` from ``dataset.json``, ``"RGB"`` for driving scenes.

    Raises:
        ValueError: unknown spec.
    """
    if isinstance(spec, dict):
        return _check_single_policy(spec)
    if spec in (None, "auto"):
        spec = {"CT": "ct", "RGB": "imagenet"}.get((modality or "").upper(), "zscore")
    if spec == "imagenet":
        return _check_single_policy(IMAGENET_RGB)
    if spec == "ct":
        return ct_policy_from_samples([c.image[0] for c in labelled], case_labels(labelled, "labelled"))
    if spec in ("zscore", "none"):
        return _check_single_policy({"scheme": spec})
    raise ValueError(
        f"normalization must be a policy dict or one of 'auto', 'ct', 'zscore', 'none', 'imagenet', got {spec!r}"
    )


def _check_single_policy(policy: dict[str, Any]) -> dict[str, Any]:
    # check_policy returns a list only for a list of per-channel policies; its annotation does not say so
    return cast(dict[str, Any], check_policy(policy))


def prepare_data(
    raw: dict[str, list[RawCase]], policy: dict[str, Any], modality: str | None = None
) -> SemiSupervisedData:
    """Normalise raw cases with ``policy`` (float32 ``(M, Z, Y, X)``)."""

    def norm(case: RawCase) -> Case:
        return Case(normalize(case.image, policy).astype(np.float32, copy=False), case.label, case.name)

    return SemiSupervisedData(
        [norm(c) for c in raw["labelled"]],
        [norm(c) for c in raw["unlabelled"]],
        [norm(c) for c in raw["val"]],
        _check_single_policy(policy),
        modality,
        training_spacing(raw["labelled"]),
    )


def data_from_arrays(
    labelled: Sequence[tuple[np.ndarray, np.ndarray]],
    unlabelled: Sequence[np.ndarray | tuple[np.ndarray, np.ndarray | None]] = (),
    val: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    *,
    normalization: str | dict[str, Any] | None = "auto",
    modality: str | None = None,
    in_channels: int = 1,
) -> SemiSupervisedData:
    """Build :class:`SemiSupervisedData` from in-memory arrays.

    Args:
        labelled: ``(image, label)`` pairs; image ``(Z, Y, X)`` or ``(M, Z, Y, X)``.
        unlabelled: images, or ``(image, truth)`` pairs (truth only for monitoring).
        val: ``(image, label)`` pairs.
        normalization: see :func:`resolve_normalization`.
        modality: e.g. ``"CT"``.
        in_channels: M.
    """

    def raw(item: Any, what: str) -> RawCase:
        image, label = item if isinstance(item, tuple) else (item, None)
        image = _as_channels(image, in_channels, what)
        return RawCase(image, check_label(label, image, what), what)

    cases = {
        "labelled": [raw(x, f"labelled[{i}]") for i, x in enumerate(labelled)],
        "unlabelled": [raw(x, f"unlabelled[{i}]") for i, x in enumerate(unlabelled)],
        "val": [raw(x, f"val[{i}]") for i, x in enumerate(val)],
    }
    if not cases["labelled"] or any(c.label is None for c in cases["labelled"] + cases["val"]):
        raise ValueError("data_from_arrays needs at least one labelled case, and labels for all labelled/val cases")
    policy = resolve_normalization(normalization, cases["labelled"], modality)
    return prepare_data(cases, policy, modality)


Threshold = float | list[float] | tuple[float, ...]
"""A confidence threshold in [0, 1], or one per class (:func:`low_confidence`)."""


def low_confidence(labels: np.ndarray, confidence: np.ndarray, threshold: Threshold | np.ndarray) -> np.ndarray:
    """Voxels whose confidence (uint8, max probability x 255) is below the threshold of their label.

    ``threshold`` is one value in [0, 1] or one per class (class-wise thresholds keep a small
    structure whose confidence is lower than the background's); labels past the list (the ignore
    label) use its last value. Returns a boolean mask of ``labels``' shape.
    """
    conf = np.asarray(confidence)
    if not isinstance(threshold, (list, tuple, np.ndarray)):
        return conf < float(threshold) * 255.0 if threshold > 0 else np.zeros(conf.shape, bool)
    limits = np.asarray(threshold, np.float32) * 255.0
    return conf < limits[np.minimum(np.asarray(labels), len(limits) - 1)]


def crop_with_padding(array: np.ndarray, origin: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """Crop the trailing ``len(size)`` axes of ``array`` at ``origin``; outside voxels get ``fill``.

    Args:
        array: ``(..., *spatial)``.
        origin: start per spatial axis (may be negative or run past the end).
        size: crop size per spatial axis.
        fill: value of voxels outside ``array``.

    Returns:
        ``(..., *size)`` new array of ``array.dtype``.
    """
    lead = array.shape[: array.ndim - len(size)]
    out = np.full(lead + tuple(size), fill, dtype=array.dtype)
    src: list[EllipsisType | slice] = [Ellipsis]
    dst: list[EllipsisType | slice] = [Ellipsis]
    for o, s, n in zip(origin, size, array.shape[len(lead) :]):
        lo, hi = max(o, 0), min(o + s, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - o, hi - o))
    out[tuple(dst)] = array[tuple(src)]
    return out


def open_array(path: str | os.PathLike[str]) -> np.ndarray:
    """A read-only memory map of an ``.npy`` file (no pickles)."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def locate_foreground(
    label: np.ndarray, num_classes: int, max_locations: int = 10000
) -> tuple[np.ndarray, dict[int, int]]:
    """Flat indices of each foreground class's voxels (at most ``max_locations`` per class,
    evenly strided), concatenated class by class in increasing class order: the index
    :class:`PatchSampler` centres foreground patches on.

    Returns:
        ``(indices int64 (N,), {class: count})`` (classes absent from ``label`` left out).
    """
    flat = np.asarray(label).ravel()
    parts, counts = [], {}
    for c in np.unique(flat):
        if 0 < c < num_classes:
            idx = np.flatnonzero(flat == c)
            idx = idx[:: max(1, len(idx) // max_locations)]
            parts.append(idx.astype(np.int64))
            counts[int(c)] = len(idx)
    return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), counts


class Sampler(Protocol):
    """What the trainer reads from a source of training samples: :class:`PatchSampler`, or
    :class:`~atso_fast.train.scene_augment.ScenePatches` (road scenes).

    Attributes:
        patch: ``(pz, py, px)``, or ``(1, py, px)`` when ``flat``.
        flat: samples are 2D ``(M, py, px)`` with labels ``(py, px)``.
        ignore_index: the label of voxels left out of the loss.
        images, labels: the cases' ``(M, Z, Y, X)`` images and ``(Z, Y, X)`` labels.
    """

    patch: tuple[int, ...]
    flat: bool
    ignore_index: int

    @property
    def images(self) -> Sequence[Any]:
        """The cases' images (arrays, or ``.npy`` paths)."""

    @property
    def labels(self) -> Sequence[Any]:
        """The cases' labels (arrays, or ``.npy`` paths)."""

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One ``(image (M, *patch), label (*patch))`` pair; ``rng`` is the only randomness."""


Source = np.ndarray | Path
"""An array in memory, or an ``.npy`` file memory-mapped each time it is read."""


def view_array(source: Source) -> np.ndarray:
    """``source`` itself when an array, else its ``.npy`` file memory-mapped (:func:`open_array`)."""
    return open_array(source) if isinstance(source, (str, os.PathLike)) else source


@dataclass
class PatchCase:
    """One case a :class:`PatchSampler` cuts patches from, in memory or in ``.npy`` files.

    ``image`` ``(M, Z, Y, X)`` float32; ``label`` ``(Z, Y, X)`` uint8; ``shape`` its ``(Z, Y, X)``;
    ``fg`` int64 flat indices of foreground voxels, ``fg_counts[c]`` of them for class ``c``,
    classes in increasing order (:func:`locate_foreground`); ``confidence`` (optional) uint8 of
    the label's shape, for thresholding at sampling time.
    """

    image: Source
    label: Source
    shape: tuple[int, ...]
    fg: Source | None = None
    fg_counts: dict[int, int] = field(default_factory=dict)
    confidence: Source | None = None


def _check_sampling(patch_size: Sequence[int], foreground_oversample: float) -> None:
    if len(patch_size) not in (2, 3) or min(patch_size) < 1:
        raise ValueError(f"patch_size must be 2 or 3 positive ints, got {tuple(patch_size)}")
    if not 0.0 <= foreground_oversample <= 1.0:
        raise ValueError(f"foreground_oversample must be in [0, 1], got {foreground_oversample}")


class PatchSampler:
    """Random patches with nnU-Net-style foreground oversampling, from arrays in memory or from
    memory-mapped ``.npy`` files (:meth:`from_cases`); both draw the same patches from the same
    data and generator.

    A sample picks a case uniformly; with probability ``foreground_oversample`` the patch is
    centred on a voxel of a foreground class (the class drawn uniformly among those present, so
    small structures are seen; the voxel from the case's foreground index, :func:`locate_foreground`),
    otherwise it is placed uniformly. Volumes smaller than the patch are padded (image 0, label
    ``ignore_index``). Nothing per case is held but what the cases hold: a case on disk is
    mapped for one patch and let go.

    Args:
        images: ``(M, Z, Y, X)`` float32 arrays.
        labels: ``(Z, Y, X)`` uint8 arrays (``ignore_index`` voxels are left out of the loss).
        patch_size: ``(pz, py, px)``, or ``(py, px)`` for 2D slices (then samples are ``(M, py, px)``).
        num_classes: C; labels in ``[1, C)`` count as foreground.
        foreground_oversample: probability of a foreground-centred patch.
        ignore_index: label of ignored voxels and padding.
        max_locations: foreground voxels kept per class and case (evenly strided).

    Raises:
        ValueError: no case, mismatched lengths or shapes, bad patch size or probability.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        patch_size: Sequence[int],
        *,
        num_classes: int,
        foreground_oversample: float = 0.33,
        ignore_index: int = 255,
        max_locations: int = 10000,
    ) -> None:
        if not images or len(images) != len(labels):
            raise ValueError(f"PatchSampler needs as many labels as images (>= 1), got {len(images)} and {len(labels)}")
        _check_sampling(patch_size, foreground_oversample)
        for img, lab in zip(images, labels):
            if img.ndim != 4 or img.shape[1:] != lab.shape:
                raise ValueError(
                    f"PatchSampler needs images (M, Z, Y, X) and labels (Z, Y, X), got {img.shape}, {lab.shape}"
                )
        cases = [
            PatchCase(img, lab, lab.shape, *locate_foreground(lab, num_classes, max_locations))
            for img, lab in zip(images, labels)
        ]
        self._setup(cases, patch_size, foreground_oversample, ignore_index, 0.0)

    @classmethod
    def from_cases(
        cls,
        cases: Sequence[PatchCase],
        patch_size: Sequence[int],
        *,
        foreground_oversample: float = 0.33,
        ignore_index: int = 255,
        threshold: Threshold = 0.0,
    ) -> PatchSampler:
        """A sampler over cases whose foreground index is already made (e.g. the preprocessing
        cache's), arrays or ``.npy`` files.

        Args:
            threshold: voxels whose confidence is below ``threshold * 255`` (one value, or one
                per class: :func:`low_confidence`) get ``ignore_index`` (cases with a
                ``confidence`` only).
            Others: as the constructor.

        Raises:
            ValueError: no case, bad patch size or probability.
        """
        if not cases:
            raise ValueError("PatchSampler.from_cases needs at least one case, got 0")
        _check_sampling(patch_size, foreground_oversample)
        sampler = cls.__new__(cls)
        sampler._setup(list(cases), patch_size, foreground_oversample, ignore_index, threshold)
        return sampler

    def _setup(
        self,
        cases: list[PatchCase],
        patch_size: Sequence[int],
        foreground_oversample: float,
        ignore_index: int,
        threshold: Threshold,
    ) -> None:
        self.cases = cases
        self.flat = len(patch_size) == 2
        self.patch = (1, *patch_size) if self.flat else tuple(int(p) for p in patch_size)
        self.p_fg, self.ignore_index = float(foreground_oversample), int(ignore_index)
        self.threshold = list(threshold) if isinstance(threshold, (list, tuple)) else float(threshold)
        # per case: [(class, offset into fg, count)] of the classes present, in increasing class order
        self._locs = [self._offsets(c.fg_counts) for c in cases]

    @property
    def images(self) -> list[Source]:
        return [c.image for c in self.cases]

    @property
    def labels(self) -> list[Source]:
        return [c.label for c in self.cases]

    @staticmethod
    def _offsets(counts: dict[int, int]) -> list[tuple[int, int, int]]:
        out, offset = [], 0
        for cls in sorted(counts):
            if counts[cls] > 0:
                out.append((cls, offset, counts[cls]))
            offset += counts[cls]
        return out

    def _origin(self, index: int, rng: np.random.Generator) -> list[int]:
        case, locs = self.cases[index], self._locs[index]
        lows = [min(0, n - p) for n, p in zip(case.shape, self.patch)]
        highs = [max(0, n - p) for n, p in zip(case.shape, self.patch)]
        if locs and rng.random() < self.p_fg:
            if case.fg is None:
                raise ValueError(f"case {index} has foreground counts {case.fg_counts} but no foreground index (fg)")
            _, offset, count = locs[int(rng.integers(len(locs)))]
            center = np.unravel_index(int(view_array(case.fg)[offset + int(rng.integers(count))]), case.shape)
            return [int(np.clip(c - p // 2, lo, hi)) for c, p, lo, hi in zip(center, self.patch, lows, highs)]
        return [int(rng.integers(lo, hi + 1)) for lo, hi in zip(lows, highs)]

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One ``(image (M, *patch), label (*patch))`` pair; ``rng`` is the only randomness."""
        index = int(rng.integers(len(self.cases)))
        case = self.cases[index]
        origin = self._origin(index, rng)
        image = crop_with_padding(view_array(case.image), origin, self.patch, 0.0)
        label = crop_with_padding(view_array(case.label), origin, self.patch, self.ignore_index)
        if case.confidence is not None and self.threshold != 0.0:
            conf = crop_with_padding(view_array(case.confidence), origin, self.patch, 255)
            label[low_confidence(label, conf, self.threshold)] = self.ignore_index
        if self.flat:
            return image[:, 0], label[0]
        return image, label
