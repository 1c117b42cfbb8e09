"""The settings of an ATSO (or baseline) run: :class:`ATSOConfig`, plain values only, so a run's
configuration round-trips through JSON and YAML, travels in every checkpoint, and is checked
once, here, with errors that name the field and the value received.

Also the choice of storage (:func:`resolve_storage`): whether a run keeps its cases and pseudo
labels in memory (:class:`atso_fast.train.stores.ArrayStore`) or in a preprocessing cache on disk
(:class:`atso_fast.train.disk_store.CacheStore`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from atso_fast.train.augment import AugmentConfig, augment_kind
from atso_fast.train.mean_teacher import MeanTeacherConfig
from atso_fast.train.resnet_unet import resnet_unet_options
from atso_fast.train.scene_augment import SceneAugmentConfig
from atso_fast.train.scene_data import SCENE_CLASSES, check_scene_spec, is_scene_spec
from atso_fast.train.trainer import OptimConfig

__all__ = ["METHODS", "INITS", "STORAGES", "MODELS", "ATSOConfig", "resolve_storage", "reports_iou"]

METHODS = ("atso", "self-training", "supervised", "oracle", "mean-teacher")
STORAGES = ("auto", "memory", "disk")
INITS = ("continue", "reinit", "m0", "lineage")
_INIT_ALIASES = {"base": "m0"}  # the name before issue 23
MODELS = ("unet", "resnet_unet")
"""Networks ``model["name"]`` may pick (no name: ``unet``)."""
_SCENE_NEEDS = {"num_classes": SCENE_CLASSES, "in_channels": 3, "spatial_dims": 2, "ignore_index": 255}


@dataclass
class ATSOConfig:
    """Everything an ATSO (or baseline) run needs; plain values only, so it round-trips via JSON.

    Attributes:
        data: a data folder, a YAML/JSON list file, a dict in list-file form, or the Cityscapes
            form (a dict with a ``cityscapes`` key: driving scenes, memory storage, and then
            ``num_classes`` 19, ``in_channels`` 3, ``spatial_dims`` 2, ``ignore_index`` 255;
            :mod:`atso_fast.train.scene_data`) (see :mod:`atso_fast.train.data`); None when data
            are passed to :class:`~atso_fast.train.atso.ATSO`.
        num_classes: C, background included.
        in_channels: M.
        spatial_dims: 3 (patches ``(pz, py, px)``) or 2 (slices, patches ``(py, px)``).
        patch_size: training patch, also the relabel window.
        batch_size: patches per step.
        model: keyword arguments of :class:`~atso_fast.train.unet.UNet` (base_channels, depth, ...);
            or ``{"name": "resnet_unet", "layers": 18 | 34, "encoder_weights": PATH | None,
            "decoder_channels": [5 widths]}``: a 2D U-Net on a ResNet encoder
            (:class:`~atso_fast.train.resnet_unet.ResNetUNet`; patches multiples of 32), its
            encoder loaded from a torchvision-layout state_dict the user has on disk (read
            ``weights_only``; nothing is downloaded), so theta0 is that encoder and a fresh decoder.
        normalization: policy dict or ``"auto"``/``"ct"``/``"zscore"``/``"none"``; the resolved policy
            is written back here and travels with checkpoints and exported models.
        method: ``"atso"``, ``"self-training"``, ``"supervised"``, ``"oracle"`` or ``"mean-teacher"``.
        rounds: fine-tuning rounds after the warm-up.
        warmup_steps: supervised steps giving M0.
        steps_per_round: fine-tuning steps per round.
        lr: warm-up peak learning rate.
        round_lr: peak learning rate of round 1; round k uses ``round_lr * round_lr_decay ** (k-1)``.
        round_lr_decay: per-round learning-rate factor.
        optim: :class:`~atso_fast.train.trainer.OptimConfig` fields (optimizer, schedule, ...).
        threshold: pseudo-label voxels with max probability below it are ignored in the loss; one
            value, or one per class (class-wise: a small structure's confidence is often lower
            than the background's, and one threshold deletes it).
        ignore_index: label of ignored voxels (>= num_classes, <= 255).
        init: where each round's student starts: ``"continue"`` (from M_{k-1}), ``"reinit"`` (from
            theta0 with the warm-up's steps and lr: the CVPR reading), ``"m0"`` (from M0; ``"base"``
            is read as ``"m0"``) or ``"lineage"`` (``"atso"`` only: one model line per held-out
            part). See the module docstring.
        consolidate: after the last round, train a final student (started as ``init`` says) on
            L + all of U with the final labels; it is the evaluated model.
        mean_teacher: :class:`~atso_fast.train.mean_teacher.MeanTeacherConfig` fields (EMA decay,
            consistency weight and ramp-up, teacher input noise) for ``method="mean-teacher"``.
        pretrained: a weights file (state dict or atso-fast checkpoint, read ``weights_only``) that
            becomes theta0: the warm-up and every ``reinit`` student start from it.
        num_subsets: parts of U for ``"atso"`` (>= 2).
        targets: ``"hard"`` (argmax labels) or ``"soft"`` (the teacher's probabilities).
        supervised_batch: ``"matched"`` (a supervised round step holds only the labelled part of a
            mixed batch) or ``"full"`` (whole batches of labelled samples).
        labelled_ratio: fraction of each batch drawn from L during fine-tuning; 0 fine-tunes on
            pseudo labels alone (the arXiv v1 description), 1 on L alone.
        foreground_oversample: probability of a foreground-centred patch.
        augment: True/False or :class:`~atso_fast.train.augment.AugmentConfig` fields (the per-patch
            recipe); or ``{"kind": "scene", ...}``: the road-scene recipe on whole frames (random
            scale, crop to ``patch_size``, horizontal flip, colour jitter; options as
            :class:`~atso_fast.train.scene_augment.SceneAugmentConfig` but ``crop``; never a
            vertical flip or rotation; 2D RGB, hard targets). With the Cityscapes data form
            ``True`` means the road-scene recipe and the per-patch one is refused.
        relabel: extra options of ``Relabeler.from_module`` (overlap, batch_size, ...); on disk
            storage of the round's ``Relabeler`` (``runtime`` defaults to ``"auto"``), plus the Ray
            pool options (workers, address, ...) with ``atso-fast train --engine ray``.
        monitor_patches: patches used for the loss-before-fine-tuning monitor.
        monitor_on_disk: on disk storage, also run the two monitors that need another engine
            pass over the training part each round: the student's start agreement (the student
            exported before it trains) and the premise's trained side (the round's package);
            memory storage always measures both.
        seed: seeds model init, split, sampling and augmentation.
        device: torch device string.
        amp: fp16 autocast on CUDA.
        channels_last: channels-last memory format on CUDA.
        out_dir: where ``checkpoint.pt`` and ``metrics.jsonl`` go (None: keep nothing on disk).
        spacing: ``(z, y, x)`` mm the model trains at, recorded in exported packages (relabelling
            then resamples scans to it); None: the labelled files' own spacing when they agree.
        storage: ``"memory"`` (every case and pseudo label in RAM), ``"disk"`` (a preprocessing
            cache, each round exports a package and relabels onto disk through the archive
            engine: :class:`~atso_fast.train.disk_store.CacheStore`) or ``"auto"``: disk when ``data``
            is a folder, list file or dict, ``out_dir`` is set, no data are passed to the trainer
            and targets are hard; memory otherwise.
        cache_dir: disk storage: the preprocessing cache (default ``out_dir/cache``).
        preprocessing: the package preprocessing spec (``atso_fast.package.spec``: orientation,
            transpose, crop to nonzero, resampling, grid) the cache applies and packages carry.
        loader_workers: disk storage: ``DataLoader`` worker processes cutting patches.
        checkpoint_every: disk storage: also checkpoint every this many training steps (0: at
            phase boundaries only).
        progress: a line on stderr as each phase starts, every 10 s while it runs (step,
            elapsed, ETA) and when it ends, with the run's ETA after each round (never minutes of
            silence); ``False``: quiet.
        class_names: one name per class, in label order, carried into exported packages
            (default: the data folder's nnU-Net ``dataset.json`` ``labels``, when they name
            classes ``0 .. num_classes - 1``; Cityscapes' trainId names for the Cityscapes form).
        report_iou: also report per-class IoU and mIoU (pooled over the images and the mean per
            image, :mod:`atso_fast.train.iou`) beside Dice, and leave out HD95 (a distance in mm,
            meaningless on photographs); None (default): on for the Cityscapes data form and for
            data normalised with the ``rgb`` scheme (:func:`reports_iou`).
    """

    data: str | dict[str, Any] | None = None
    num_classes: int = 2
    in_channels: int = 1
    spatial_dims: int = 3
    patch_size: tuple[int, ...] = (32, 64, 64)
    batch_size: int = 2
    model: dict[str, Any] = field(default_factory=lambda: {"base_channels": 16, "depth": 4})
    normalization: str | dict[str, Any] = "auto"
    method: str = "atso"
    rounds: int = 4
    warmup_steps: int = 250
    steps_per_round: int = 100
    lr: float = 1e-3
    round_lr: float = 5e-4
    round_lr_decay: float = 1.0
    optim: dict[str, Any] = field(default_factory=dict)
    threshold: float | list[float] = 0.0
    ignore_index: int = 255
    init: str = "continue"
    consolidate: bool = True
    pretrained: str | None = None
    mean_teacher: dict[str, Any] = field(default_factory=dict)
    num_subsets: int = 2
    targets: str = "hard"
    supervised_batch: str = "matched"
    labelled_ratio: float = 0.5
    foreground_oversample: float = 0.33
    augment: bool | dict[str, Any] = True
    relabel: dict[str, Any] = field(default_factory=dict)
    monitor_patches: int = 8
    monitor_on_disk: bool = False
    seed: int = 0
    device: str = "cpu"
    amp: bool = True
    channels_last: bool = True
    out_dir: str | None = None
    spacing: list[float] | None = None
    storage: str = "auto"
    cache_dir: str | None = None
    preprocessing: dict[str, Any] | None = None
    loader_workers: int = 0
    checkpoint_every: int = 0
    progress: bool = True
    class_names: list[str] | None = None
    report_iou: bool | None = None

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self._check_choices()
        if self.spatial_dims not in (2, 3) or len(self.patch_size) != self.spatial_dims or min(self.patch_size) < 1:
            raise ValueError(
                f"patch_size must have spatial_dims={self.spatial_dims} positive sizes, got {self.patch_size}"
            )
        if self.num_classes < 2 or not self.num_classes <= self.ignore_index <= 255:
            raise ValueError(
                f"need num_classes >= 2 and num_classes <= ignore_index <= 255, "
                f"got {self.num_classes}, {self.ignore_index}"
            )
        for name in ("rounds", "warmup_steps", "steps_per_round", "monitor_patches"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.threshold = _check_threshold(self.threshold, self.num_classes)
        for name in ("labelled_ratio", "foreground_oversample"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not (self.lr > 0 and self.round_lr > 0 and self.round_lr_decay > 0):
            raise ValueError(
                f"lr, round_lr and round_lr_decay must be > 0, got {self.lr}, {self.round_lr}, {self.round_lr_decay}"
            )
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {self.storage!r}")
        if int(self.loader_workers) < 0 or int(self.checkpoint_every) < 0:
            raise ValueError(
                f"loader_workers and checkpoint_every must be >= 0, got {self.loader_workers}, {self.checkpoint_every}"
            )
        if self.in_channels < 1 or self.batch_size < 1:
            raise ValueError(f"in_channels and batch_size must be >= 1, got {self.in_channels}, {self.batch_size}")
        if self.report_iou not in (None, True, False):
            raise ValueError(f"report_iou must be true, false or null, got {self.report_iou!r}")
        OptimConfig.from_value(self.optim)
        MeanTeacherConfig.from_value(self.mean_teacher)
        self._check_scene()
        self._check_augment()
        self._check_model()

    def _check_scene(self) -> None:
        """The Cityscapes data form: its keys, the settings its frames need, memory storage, and
        ``augment: true`` read as the road-scene recipe."""
        if not isinstance(self.data, dict) or not is_scene_spec(self.data):
            return
        check_scene_spec(self.data)
        wrong = {k: getattr(self, k) for k, v in _SCENE_NEEDS.items() if getattr(self, k) != v}
        if wrong:
            raise ValueError(
                f"the cityscapes data form (RGB frames, 19 trainId classes, 255 ignored) needs "
                f"{_SCENE_NEEDS}, got {wrong}"
            )
        if self.storage == "disk":
            raise ValueError(
                "the cityscapes data form runs on memory storage (frames are small enough to hold in "
                "RAM); got storage 'disk'"
            )
        if self.augment is True:
            self.augment = {"kind": "scene"}
        elif augment_kind(self.augment) == "medical":
            raise ValueError(
                f"driving scenes are never flipped upside down or rotated: augment must be true (the "
                f"road-scene recipe), false or {{kind: scene, ...}}, got {self.augment!r}"
            )

    def _check_augment(self) -> None:
        if augment_kind(self.augment) != "scene":
            AugmentConfig.from_value(self.augment)
            return
        SceneAugmentConfig.from_value(self.augment, self.patch_size, self.ignore_index)
        if self.spatial_dims != 2 or self.in_channels != 3 or self.targets != "hard":
            raise ValueError(
                f"augment kind 'scene' augments 2D RGB frames with hard targets: needs spatial_dims 2, "
                f"in_channels 3 and targets 'hard', got {self.spatial_dims}, {self.in_channels}, "
                f"{self.targets!r}"
            )

    def _check_model(self) -> None:
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a dict, got {self.model!r}")
        name = self.model.get("name", "unet")
        if name not in MODELS:
            raise ValueError(f"model name must be one of {MODELS}, got {name!r}")
        if name == "resnet_unet":
            resnet_unet_options(self.model)
            if self.spatial_dims != 2:
                raise ValueError(f"model 'resnet_unet' is 2D: needs spatial_dims 2, got {self.spatial_dims}")

    def _check_choices(self) -> None:
        self.init = _INIT_ALIASES.get(self.init, self.init)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.method == "mean-teacher" and self.init != "continue":
            raise ValueError(
                f"method 'mean-teacher' trains one student and its EMA teacher through every round "
                f"(init 'continue'), got init {self.init!r}"
            )
        if self.init == "lineage" and self.method != "atso":
            raise ValueError(
                f"init 'lineage' needs method 'atso' (model lines per held-out part), got method {self.method!r}"
            )
        if int(self.num_subsets) < 2:
            raise ValueError(f"num_subsets must be >= 2, got {self.num_subsets}")
        if self.targets not in ("hard", "soft"):
            raise ValueError(f"targets must be 'hard' or 'soft', got {self.targets!r}")
        if self.supervised_batch not in ("matched", "full"):
            raise ValueError(f"supervised_batch must be 'matched' or 'full', got {self.supervised_batch!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ATSOConfig:
        """Build from a plain dict (e.g. a parsed YAML file); unknown keys are an error."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown ATSOConfig keys {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def coerce(cls, config: ATSOConfig | dict[str, Any]) -> ATSOConfig:
        if isinstance(config, cls):
            return replace(config)
        if isinstance(config, dict):
            return cls.from_dict(config)
        raise ValueError(f"config must be an ATSOConfig or a dict, got {type(config).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))


def _check_threshold(value: Any, num_classes: int) -> float | list[float]:
    """One confidence threshold in [0, 1], or one per class (a list of ``num_classes``)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and len(values) != num_classes:
        raise ValueError(f"threshold must be one number or one per class ({num_classes}), got {len(values)} values")
    if not all(isinstance(v, (int, float)) and 0.0 <= float(v) <= 1.0 for v in values):
        raise ValueError(f"threshold values must be in [0, 1], got {value}")
    return [float(v) for v in values] if isinstance(value, (list, tuple)) else float(value)


def resolve_storage(config: ATSOConfig | dict[str, Any], data: Any = None) -> str:
    """``"memory"`` or ``"disk"`` for a config (see :attr:`ATSOConfig.storage`; the Cityscapes
    data form: memory)."""
    config = config if isinstance(config, ATSOConfig) else ATSOConfig.coerce(config)
    if config.storage != "auto":
        return config.storage
    if is_scene_spec(config.data):
        return "memory"
    on_disk = isinstance(config.data, (str, Path, dict)) and data is None and config.out_dir is not None
    return "disk" if on_disk and config.targets == "hard" else "memory"


def reports_iou(config: ATSOConfig) -> bool:
    """Whether evaluation reports IoU and mIoU (:attr:`ATSOConfig.report_iou`; None: for the
    Cityscapes data form and for data normalised with the ``rgb`` scheme)."""
    if config.report_iou is not None:
        return bool(config.report_iou)
    policy = config.normalization
    scheme = policy.get("scheme") if isinstance(policy, dict) else policy
    return is_scene_spec(config.data) or scheme in ("rgb", "imagenet")
