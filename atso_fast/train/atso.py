"""Asynchronous teacher-student optimisation (ATSO) and its baselines, in one code path.

ATSO (Huo et al., arXiv 2006.13461; CVPR 2021): a supervised warm-up on the labelled set L gives
M0, which pseudo-labels every part of a fixed, seeded, voxel-balanced split of the unlabelled set
U into ``num_subsets`` parts (two, U1 and U2, in the paper). Round k fine-tunes a student on
L + pseudo(U \\ Uj) and then relabels the held-out part Uj (``j = k mod K + 1``: with two parts,
odd rounds train on U1 and relabel U2, even rounds the reverse), so a model never relabels what it
was just fine-tuned on.

Where each round's student starts (``init``):
    ``"continue"`` from the previous round's model (the arXiv v1 reading: "alternately uses one
        subset to fine-tune the model and updates the label on the other subset"). From round 2
        the student trains on labels it produced itself one round earlier: the asynchrony holds
        only on the relabelling side.
    ``"reinit"``   from theta0, the run's initial weights (random, or ``pretrained``), with the
        warm-up's full schedule every round (the CVPR 2021 reading: ATSO "breaks up continual
        learning from teacher to student"): no student inherits any teacher's weights.
    ``"m0"``       from M0 every round (``"base"`` before): no student starts from the model that
        made its targets, but every student restarts from the same supervised model.
    ``"lineage"``  one model per held-out part, each continuing its own line (two lineages for
        two parts): the model that relabels Uj never trains on Uj.

After the last round, ``consolidate`` (on by default) trains one final student, started as
``init`` says, on L + every part of U with the final labels, relabelling nothing: the model
every arm is evaluated with (``metrics`` row ``stage: "consolidate"``, model ``Mc``). Without
it the final model of ATSO has seen one part of U only and the freshest labels go unused.

Targets (``targets``): ``"hard"`` argmax labels (voxels below ``threshold`` confidence ignored)
or ``"soft"`` the teacher's probabilities (cross-entropy + soft Dice against them).

Baselines (same rounds, steps, learning rates and sampling):
    ``method="supervised"``    fine-tune on L only; by default (``supervised_batch="matched"``) each
        step holds only the labelled part of a mixed batch, so it sees as many labelled samples
        as the semi-supervised runs.
    ``method="self-training"`` fine-tune on L + pseudo(U), then relabel all of U with that model.
    ``method="oracle"``        fine-tune on L + U with U's true labels (the headroom).
    ``method="mean-teacher"``  one student through every round with an EMA teacher and a
        consistency loss on U's images (Tarvainen and Valpola 2017, the SSL4MIS recipe:
        :mod:`atso_fast.train.mean_teacher`); relabels nothing; memory storage only.

Monitors per round (``metrics["student"]``, ``metrics["monitor"][subset]``, ``metrics["premise"]``):
the student's hard Dice agreement with its targets before it trains (1.0 is the lazy condition:
nothing left to learn; a ``continue`` student from round 2 sits near it by construction), its
loss on the pseudo-labelled part of its batches alone; for each relabelled part the foreground
label change since the previous labels and since M0's, and, with known truth, the pseudo labels'
Dice before and after; and the paper's premise (:func:`premise`): how much the round's model
improves on the labels of the part it trained on, against the improvement of the part it
relabelled (truth known only).

Every random choice of round k comes from generators seeded by ``(seed, k, purpose)``, and the
optimiser is created fresh each round, so a run resumed from the checkpoint of round k gives
exactly the tensors of an uninterrupted run (same device and thread count).

The relabel step is a callable ``relabel_fn(model, volumes) -> [(labels, confidence), ...]`` with
volumes ``(M, Z, Y, X)`` float32 *already normalised*, labels ``(Z, Y, X)`` uint8 and confidence
``(Z, Y, X)`` uint8 (max probability * 255); for soft targets each result also carries the
probabilities ``(C, Z, Y, X)``. The default (:func:`default_relabel_fn`) runs the engine's sliding
window with the training patch as the window, so an InstanceNorm network sees the same context
when it relabels as when it trained (a whole-slice pass normalises over other statistics).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from atso_fast.engine.relabeler import Relabeler
from atso_fast.io import atomic_write_bytes, read_regular_file
from atso_fast.progress import Progress, duration
from atso_fast.train.augment import AugmentConfig
from atso_fast.train.curves import CURVES_NAME, curves_png
from atso_fast.train.data import (
    Case,
    PatchSampler,
    SemiSupervisedData,
    dataset_class_names,
    load_raw,
    low_confidence,
    prepare_data,
    resolve_normalization,
)
from atso_fast.train.mean_teacher import MeanTeacher, MeanTeacherConfig, mean_teacher_batches
from atso_fast.train.metrics import as_case_maps, case_metrics, case_summary
from atso_fast.train.monitor import foreground_change, pooled_dice
from atso_fast.train.trainer import MixedBatches, OptimConfig, mean_loss, train_steps
from atso_fast.train.unet import UNet

__all__ = [
    "METHODS",
    "INITS",
    "ATSOConfig",
    "ATSO",
    "RelabelFn",
    "split_balanced",
    "subset_names",
    "plan_round",
    "build_model",
    "default_relabel_fn",
    "load_data",
    "run_methods",
    "load_pretrained",
    "model_name",
    "premise",
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "STORAGES",
    "register_storage",
    "resolve_storage",
]

log = logging.getLogger(__name__)

METHODS = ("atso", "self-training", "supervised", "oracle", "mean-teacher")
STORAGES = ("auto", "memory", "disk")
INITS = ("continue", "reinit", "m0", "lineage")
_INIT_ALIASES = {"base": "m0"}  # the name before issue 23
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
_FORMAT_VERSION = 3
_TRAIN, _MONITOR, _SPLIT = 1, 2, 3  # rng purposes

RelabelFn = Callable[[nn.Module, Sequence[np.ndarray]], list[tuple[np.ndarray, ...]]]
Callback = Callable[["ATSO", dict[str, Any]], None]


@dataclass
class ATSOConfig:
    """Everything an ATSO (or baseline) run needs; plain values only, so it round-trips via JSON.

    Attributes:
        data: a data folder, a YAML/JSON list file, or a dict in list-file form
            (see :mod:`atso_fast.train.data`); None when data are passed to :class:`ATSO`.
        num_classes: C, background included.
        in_channels: M.
        spatial_dims: 3 (patches ``(pz, py, px)``) or 2 (slices, patches ``(py, px)``).
        patch_size: training patch, also the relabel window.
        batch_size: patches per step.
        model: keyword arguments of :class:`~atso_fast.train.unet.UNet` (base_channels, depth, ...).
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
        augment: True/False or :class:`~atso_fast.train.augment.AugmentConfig` fields.
        relabel: extra options of ``Relabeler.from_module`` (overlap, batch_size, ...); on disk
            storage of the round's ``Relabeler`` (``runtime`` defaults to ``"auto"``), plus the Ray
            pool options (workers, address, ...) with ``atso-fast train --engine ray``.
        monitor_patches: patches used for the loss-before-fine-tuning monitor.
        seed: seeds model init, split, sampling and augmentation.
        device: torch device string.
        amp: fp16 autocast on CUDA.
        channels_last: channels-last memory format on CUDA.
        out_dir: where ``checkpoint.pt`` and ``metrics.jsonl`` go (None: keep nothing on disk).
        spacing: ``(z, y, x)`` mm the model trains at, recorded in exported packages (relabelling
            then resamples scans to it); None: the labelled files' own spacing when they agree.
        storage: ``"memory"`` (every case and pseudo label in RAM), ``"disk"`` (a preprocessing
            cache, each round exports a package and relabels onto disk through the archive
            engine: :mod:`atso_fast.train.archive_loop`) or ``"auto"``: disk when ``data`` is a
            folder, list file or dict, ``out_dir`` is set, no data are passed to :class:`ATSO`
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
            classes ``0 .. num_classes - 1``).
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

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self._check_choices()
        if self.spatial_dims not in (2, 3) or len(self.patch_size) != self.spatial_dims \
                or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must have spatial_dims={self.spatial_dims} positive sizes, "
                             f"got {self.patch_size}")
        if self.num_classes < 2 or not self.num_classes <= self.ignore_index <= 255:
            raise ValueError(f"need num_classes >= 2 and num_classes <= ignore_index <= 255, "
                             f"got {self.num_classes}, {self.ignore_index}")
        for name in ("rounds", "warmup_steps", "steps_per_round", "monitor_patches"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.threshold = _check_threshold(self.threshold, self.num_classes)
        for name in ("labelled_ratio", "foreground_oversample"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not (self.lr > 0 and self.round_lr > 0 and self.round_lr_decay > 0):
            raise ValueError(f"lr, round_lr and round_lr_decay must be > 0, got {self.lr}, {self.round_lr}, "
                             f"{self.round_lr_decay}")
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {self.storage!r}")
        if int(self.loader_workers) < 0 or int(self.checkpoint_every) < 0:
            raise ValueError(f"loader_workers and checkpoint_every must be >= 0, got {self.loader_workers}, "
                             f"{self.checkpoint_every}")
        if self.in_channels < 1 or self.batch_size < 1:
            raise ValueError(f"in_channels and batch_size must be >= 1, got {self.in_channels}, {self.batch_size}")
        OptimConfig.from_value(self.optim)
        AugmentConfig.from_value(self.augment)
        MeanTeacherConfig.from_value(self.mean_teacher)

    def _check_choices(self) -> None:
        self.init = _INIT_ALIASES.get(self.init, self.init)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.method == "mean-teacher" and self.init != "continue":
            raise ValueError(f"method 'mean-teacher' trains one student and its EMA teacher through every round "
                             f"(init 'continue'), got init {self.init!r}")
        if self.init == "lineage" and self.method != "atso":
            raise ValueError(f"init 'lineage' needs method 'atso' (model lines per held-out part), "
                             f"got method {self.method!r}")
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


def split_balanced(sizes: Sequence[int], seed: int, parts: int = 2) -> tuple[list[int], ...]:
    """Split case indices into ``parts`` groups with about equal voxel counts.

    Cases are shuffled by ``seed``, stably sorted by size (largest first), and each goes to the
    group with fewer voxels (then fewer cases, then the lower index). Deterministic for a given
    ``(sizes, seed, parts)``; any two voxel totals differ by at most the largest case.

    Args:
        sizes: voxel count of each case (>= ``parts`` cases).
        seed: split seed.
        parts: number of groups (>= 2).

    Returns:
        ``parts`` sorted index lists, all non-empty.

    Raises:
        ValueError: fewer cases than parts, fewer than 2 parts, or a negative size.
    """
    if int(parts) < 2 or len(sizes) < int(parts) or (len(sizes) and min(sizes) < 0):
        raise ValueError(f"split_balanced needs parts >= 2 and >= parts non-negative sizes, got parts={parts}, "
                         f"sizes={list(sizes)}")
    order = np.random.default_rng([int(seed), _SPLIT]).permutation(len(sizes))
    order = sorted(order.tolist(), key=lambda i: -int(sizes[i]))
    groups: list[list[int]] = [[] for _ in range(int(parts))]
    loads = [0] * int(parts)
    for i in order:
        g = min(range(len(groups)), key=lambda h: (loads[h], len(groups[h]), h))
        groups[g].append(i)
        loads[g] += int(sizes[i])
    return tuple(sorted(g) for g in groups)


def subset_names(num_subsets: int) -> tuple[str, ...]:
    """``("U1", ..., "UK")``."""
    return tuple(f"U{i + 1}" for i in range(int(num_subsets)))


def plan_round(method: str, k: int, num_subsets: int = 2) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Which subsets round ``k`` (>= 1) trains on, and which it relabels after.

    ``atso``: the held-out part is ``U{k mod K + 1}``; the round trains on every other part and
    relabels the held-out one (two parts: odd k trains on U1 and relabels U2, even k the reverse).
    ``self-training``: U and U. ``oracle``: U (true labels) and nothing. ``mean-teacher``: U (images
    only) and nothing. ``supervised``: nothing.
    """
    if k < 1 or method not in METHODS or int(num_subsets) < 2:
        raise ValueError(f"plan_round needs k >= 1, method in {METHODS} and num_subsets >= 2, got k={k}, "
                         f"method={method!r}, num_subsets={num_subsets}")
    if method == "atso":
        names = subset_names(num_subsets)
        held = names[k % len(names)]
        return tuple(n for n in names if n != held), (held,)
    if method == "self-training":
        return ("U",), ("U",)
    if method in ("oracle", "mean-teacher"):
        return ("U",), ()
    return (), ()


def build_model(config: ATSOConfig) -> UNet:
    """The config's U-Net, initialised from ``config.seed`` without touching torch's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = UNet(config.in_channels, config.num_classes, spatial_dims=config.spatial_dims, **config.model)
    if any(p % model.divisor for p in config.patch_size):
        raise ValueError(f"patch_size {config.patch_size} must be multiples of {model.divisor} for depth {model.depth}")
    return model


def default_relabel_fn(config: ATSOConfig, *, probabilities: bool = False) -> RelabelFn:
    """A ``relabel_fn`` running the relabel engine (``Relabeler.from_module``) on the live model.

    The engine window is ``config.patch_size``; volumes are passed with ``normalized=True`` (they
    are normalised already), confidence thresholding is left to the trainer (engine threshold 0).
    With ``probabilities`` each result is ``(labels, confidence, probabilities (C, Z, Y, X))``.
    """
    def relabel(model: nn.Module, volumes: Sequence[np.ndarray]) -> list[tuple[np.ndarray, ...]]:

        engine = Relabeler.from_module(
            model, window=config.patch_size, num_classes=config.num_classes, kind="logits",
            normalization=config.normalization if isinstance(config.normalization, dict) else None,
            in_channels=config.in_channels, device=config.device,
            **{"threshold": 0.0, "ignore_index": config.ignore_index, "save_probabilities": probabilities,
               **config.relabel})
        results = [engine.relabel_volume(v[0] if v.shape[0] == 1 else v, normalized=True) for v in volumes]
        if probabilities:
            return [(r.labels, r.confidence, r.probabilities) for r in results]
        return [(r.labels, r.confidence) for r in results]

    return relabel


_STORAGE_CLASSES: dict[str, type] = {}


def register_storage(name: str, cls: type) -> None:
    """Make ``ATSO(config)`` build ``cls`` when the config resolves to storage ``name``.

    ``atso_fast.train`` registers ``"disk"`` (:class:`atso_fast.train.archive_loop.ArchiveATSO`,
    a subclass of :class:`ATSO`) on import; the class lives in its own module, which imports
    this one, so this registry keeps the imports one-way.
    """
    _STORAGE_CLASSES[name] = cls


def resolve_storage(config: ATSOConfig | dict[str, Any], data: Any = None) -> str:
    """``"memory"`` or ``"disk"`` for a config (see :attr:`ATSOConfig.storage`)."""
    config = config if isinstance(config, ATSOConfig) else ATSOConfig.coerce(config)
    if config.storage != "auto":
        return config.storage
    on_disk = isinstance(config.data, (str, Path, dict)) and data is None and config.out_dir is not None
    return "disk" if on_disk and config.targets == "hard" else "memory"


def load_data(config: ATSOConfig | dict[str, Any]) -> SemiSupervisedData:
    """Read and normalise ``config.data`` with ``config.normalization`` (resolved here).

    Raises:
        ValueError: no ``data`` in the config, or see :func:`~atso_fast.train.data.load_raw`.
    """
    config = ATSOConfig.coerce(config)
    if config.data is None:
        raise ValueError("ATSO needs data: set config.data (folder, list file or dict) or pass data=")
    raw, modality = load_raw(config.data, in_channels=config.in_channels, num_classes=config.num_classes,
                             ignore_index=config.ignore_index)
    policy = resolve_normalization(config.normalization, raw["labelled"], modality)
    return prepare_data(raw, policy, modality)


def load_checkpoint_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A trainer checkpoint read without blocking and loaded with ``weights_only=True``.

    Raises:
        ValueError: not a regular file, or truncated/corrupt (the message names the file).
    """
    data = read_regular_file(path)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (truncated zip), EOFError ...
        raise ValueError(f"{path}: not a readable atso-fast checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}); delete it to start "
                         "afresh") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not an atso-fast checkpoint (holds {type(state).__name__})")
    return state


def run_methods(config: ATSOConfig | dict[str, Any],
                methods: Sequence[str] | Mapping[str, dict[str, Any]] = METHODS, *,
                data: SemiSupervisedData | None = None, relabeler: RelabelFn | None = None,
                callbacks: Sequence[Callback] = ()) -> dict[str, ATSO]:
    """Run several methods (or variants) from one shared warm-up, for paired comparisons.

    The warm-up (M0 and its pseudo labels for all of U, with probabilities when any run uses soft
    targets) runs once, as ``"atso"`` (with one unlabelled case as ``"self-training"``, with none
    as ``"supervised"``), and its state seeds every run. With ``config.out_dir`` set, the warm-up
    checkpoint goes to ``out_dir/warmup`` and each run writes to ``out_dir/<name>``.

    Args:
        config: the shared settings.
        methods: method names, or run names mapped to :class:`ATSOConfig` overrides, e.g.
            ``{"atso t=0.9": {"method": "atso", "threshold": 0.9}}``. Overrides should change only
            round settings (threshold, init, round_lr, ...): the warm-up is computed once, with
            ``config``.
        data, relabeler, callbacks: as for :class:`ATSO` (a custom ``relabeler`` must return
            probabilities when any run uses soft targets).

    Returns:
        the finished :class:`ATSO` runs by name, in the given order.

    Raises:
        ValueError: unknown method or override, or see :class:`ATSO`.
    """
    config = ATSOConfig.coerce(config)
    plans = _method_plans(methods)
    data = data if data is not None else load_data(config)
    n = len(data.unlabelled)
    soft = any(p.get("targets", config.targets) == "soft" for p in plans.values())
    warm_run = ATSO(replace(config, method="atso" if n >= 2 else "self-training" if n == 1 else "supervised",
                            init="continue", num_subsets=2, targets="soft" if soft else "hard",
                            out_dir=_subdir(config.out_dir, "warmup")),
                    relabeler=relabeler, data=data, callbacks=callbacks)
    warm_run.warmup()
    warm = warm_run.state_dict()
    runs = {}
    for name, overrides in plans.items():
        run = ATSO(replace(config, **{"out_dir": _subdir(config.out_dir, name), **overrides}),
                   relabeler=relabeler, data=data, callbacks=callbacks)
        run.load_state_dict(warm)
        run.run()
        runs[name] = run
    return runs


def _method_plans(methods: Sequence[str] | Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    plans = dict(methods) if isinstance(methods, Mapping) else {m: {"method": m} for m in methods}
    known = {f.name for f in fields(ATSOConfig)}
    for name, overrides in plans.items():
        method = overrides.get("method", name)
        unknown = set(overrides) - known
        if method not in METHODS or unknown:
            raise ValueError(f"run {name!r}: method must be one of {METHODS} and overrides ATSOConfig "
                             f"fields, got method {method!r}, unknown fields {sorted(unknown)}")
        plans[name] = {**overrides, "method": method}
    return plans


def _subdir(out_dir: str | None, name: str) -> str | None:
    return None if out_dir is None else str(Path(out_dir) / name.replace(" ", "_").replace("/", "_"))


def model_name(k: int, rounds: int) -> str:
    """``M0`` (warm-up), ``M1`` .. ``MR`` (rounds), ``Mc`` (the consolidated model)."""
    return "Mc" if k > rounds else f"M{k}"


def load_pretrained(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load pretrained weights into ``model``: a state dict, or an atso-fast checkpoint (its
    ``model``), read with ``weights_only=True`` (never unpickled).

    Raises:
        ValueError: unreadable file, or weights that do not fit the model (names the file).
    """
    state = load_checkpoint_file(path)
    state = state["model"] if isinstance(state.get("model"), dict) else state
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{path}: pretrained weights do not fit the model: {str(exc).splitlines()[0][:300]}") from None


def premise(trained: dict[str, float], held: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The paper's premise, per round: a model learns little about the labels it trained on
    (lazy learning) and improves the labels of a part it did not train on.

    ``trained``: from :meth:`ATSO._premise_trained`; ``held``: the monitors of the parts this
    round relabelled (``pseudo_dice`` and ``pseudo_dice_before``). Gains are Dice against the
    hidden truth, after minus before; NaN where the truth is unknown.
    """
    before = [m.get("pseudo_dice_before", math.nan) for m in held]
    after = [m.get("pseudo_dice", math.nan) for m in held]
    held_gain = float(np.mean([a - b for a, b in zip(after, before)])) if held else math.nan
    return {"trained_label_dice": trained.get("label_dice", math.nan),
            "trained_model_dice": trained.get("model_dice", math.nan),
            "trained_gain": trained.get("model_dice", math.nan) - trained.get("label_dice", math.nan),
            "trained_agreement": trained.get("agreement", math.nan),
            "held_gain": held_gain}


def _rng(seed: int, k: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(k), int(purpose)])


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _tensors(arrays: Sequence[np.ndarray | None]) -> list[torch.Tensor | None]:
    return [None if a is None else torch.from_numpy(np.ascontiguousarray(a).copy()) for a in arrays]


def _arrays(tensors: Sequence[torch.Tensor | None] | None, n: int) -> list[np.ndarray | None]:
    return [None] * n if tensors is None else [None if t is None else t.numpy().copy() for t in tensors]


class ATSO:
    """ATSO / self-training / supervised / oracle fine-tuning, round by round, with checkpoints.

    Args:
        config: :class:`ATSOConfig` or a dict of its fields.
        model: any ``nn.Module`` mapping ``(B, M, *patch)`` to logits ``(B, C, *patch)``; default a
            :class:`~atso_fast.train.unet.UNet` from ``config.model``.
        relabeler: ``relabel_fn(model, volumes)`` (see module docstring); default
            :func:`default_relabel_fn` (with probabilities for soft targets).
        data: :class:`~atso_fast.train.data.SemiSupervisedData`; default loaded from ``config.data``.
        callbacks: ``fn(atso, metrics)`` called after the warm-up and after every round.
        archive_engine: disk storage only: the bulk relabel engine of each round
            (:func:`atso_fast.train.archive_loop.local_engine` by default; the CLI's
            ``--engine ray`` passes the Ray engine).

    With ``config.storage`` resolving to ``"disk"`` (:func:`resolve_storage`) ``ATSO(config)``
    returns an :class:`atso_fast.train.archive_loop.ArchiveATSO`, with the same methods.

    Raises:
        ValueError: bad config, no data, too few unlabelled cases for the method, an oracle
            without the unlabelled cases' true labels.
    """

    def __new__(cls, config: ATSOConfig | dict[str, Any], *args: Any, **kwargs: Any) -> ATSO:
        # ATSO(config) on on-disk data builds the disk-storage subclass (register_storage)
        if cls is ATSO and "disk" in _STORAGE_CLASSES and resolve_storage(config, kwargs.get("data")) == "disk":
            return super().__new__(_STORAGE_CLASSES["disk"])
        return super().__new__(cls)

    def __init__(self, config: ATSOConfig | dict[str, Any], model: nn.Module | None = None,
                 relabeler: RelabelFn | None = None, *, data: SemiSupervisedData | None = None,
                 callbacks: Sequence[Callback] = (), archive_engine: Any = None) -> None:
        config = ATSOConfig.coerce(config)
        if config.storage == "disk":
            raise ValueError("storage='disk' needs data on disk (a folder, list file or dict in config.data), "
                             "out_dir set, no data= and hard targets")
        self.data = data if data is not None else load_data(config)
        self.config = replace(config, normalization=dict(self.data.normalization),
                              spacing=config.spacing if config.spacing is not None else self.data.spacing,
                              class_names=config.class_names or dataset_class_names(config.data, config.num_classes))
        self.model = model if model is not None else build_model(self.config)
        if self.config.pretrained is not None:
            load_pretrained(self.model, self.config.pretrained)
        self.init_state = _state_copy(self.model)  # theta0: where reinit students start
        self.soft = self.config.targets == "soft"
        self.relabel_fn = relabeler if relabeler is not None else \
            default_relabel_fn(self.config, probabilities=self.soft)
        self.callbacks = list(callbacks)
        self.subsets = self._make_subsets()
        self.round_index = -1
        n = len(self.data.unlabelled)
        self.pseudo: list[np.ndarray | None] = [None] * n
        self.confidence: list[np.ndarray | None] = [None] * n
        self.probs: list[np.ndarray | None] = [None] * n  # (C, Z, Y, X) float16, soft targets only
        self.m0_labels: list[np.ndarray | None] = [None] * n
        self.labelled_by: list[str | None] = [None] * n
        self.history: list[dict[str, Any]] = []
        self.base_state: dict[str, torch.Tensor] | None = None
        self.lineages: dict[str, dict[str, Any]] = {}  # held-out part -> {"model": "Mk", "state": ...}
        self._labelled_sampler: PatchSampler | None = None
        self._fresh: dict[int, tuple[np.ndarray, ...]] = {}  # predictions of the current model, by case
        self.teacher_state: dict[str, Any] | None = None  # mean-teacher: the EMA teacher between rounds

    def _make_subsets(self) -> dict[str, list[int]]:
        cfg, cases = self.config, self.data.unlabelled
        n = len(cases)
        if cfg.method == "supervised":
            return {}
        if cfg.method == "oracle":
            missing = [c.name or str(i) for i, c in enumerate(cases) if c.label is None]
            if n < 1 or missing:
                raise ValueError(f"method 'oracle' needs the true labels of every unlabelled case (>= 1); got {n} "
                                 f"cases, {len(missing)} without a label: {missing[:5]}")
            return {"U": list(range(n))}
        if cfg.method in ("self-training", "mean-teacher"):
            if n < 1:
                raise ValueError(f"method {cfg.method!r} needs at least 1 unlabelled case, got 0")
            return {"U": list(range(n))}
        if n < cfg.num_subsets:
            raise ValueError(f"method 'atso' needs at least {cfg.num_subsets} unlabelled cases to split into "
                             f"{cfg.num_subsets} parts, got {n}")
        parts = split_balanced([c.image[0].size for c in cases], cfg.seed, cfg.num_subsets)
        return dict(zip(subset_names(cfg.num_subsets), parts))

    def add_callback(self, fn: Callback) -> None:
        """Call ``fn(atso, metrics)`` after the warm-up and after every round."""
        self.callbacks.append(fn)

    # ------------------------------------------------------------------ stages
    def warmup(self) -> dict[str, Any]:
        """Supervised training on L (M0), then pseudo-labels for every subset. Returns metrics."""
        if self.round_index >= 0:
            raise RuntimeError("warm-up already done (round_index >= 0)")
        cfg, start = self.config, time.perf_counter()
        stats = train_steps(self.model, self._batches(None), steps=cfg.warmup_steps, lr=cfg.lr,
                            rng=_rng(cfg.seed, 0, _TRAIN), **self._train_kwargs("warm-up on L", cfg.warmup_steps))
        self.base_state = _state_copy(self.model)
        metrics = {"round": 0, "stage": "warm-up", "method": cfg.method, "model": "M0", "student_from": None,
                   "trained_on": ["L"], "train_labels_from": {}, "train": stats, "student": {}}
        metrics.update(self._relabel_subsets(tuple(self.subsets), "M0"))
        self.m0_labels = list(self.pseudo)  # relabelling replaces arrays, never edits them in place
        return self._finish(metrics, start)

    def round(self) -> dict[str, Any]:
        """Run the next round (start the student, fine-tune, relabel per :func:`plan_round`)."""
        cfg = self.config
        if self.round_index < 0:
            raise RuntimeError("call warmup() before round()")
        if self.round_index >= cfg.rounds:
            raise RuntimeError(f"all {cfg.rounds} rounds are done")
        k = self.round_index + 1
        return self._train_round(k, *plan_round(cfg.method, k, cfg.num_subsets))

    def consolidate(self) -> dict[str, Any]:
        """The final student: trained on L + every part of U with the final labels (started as
        ``init`` says), relabelling nothing. It is the model the run is evaluated with."""
        cfg = self.config
        if self.round_index != cfg.rounds:
            raise RuntimeError(f"consolidate() follows the last round ({cfg.rounds}); the run is at "
                               f"{self.round_index}")
        return self._train_round(cfg.rounds + 1, tuple(self.subsets), ())

    @property
    def finished(self) -> bool:
        """Warm-up, every round and (with ``consolidate``) the consolidation step are done."""
        return self.round_index >= self.config.rounds + int(self.config.consolidate)

    def _train_round(self, k: int, train_on: tuple[str, ...], relabel: tuple[str, ...]) -> dict[str, Any]:
        cfg, start = self.config, time.perf_counter()
        student_from = self._start_student(k, relabel)
        idx = sorted(i for name in train_on for i in self.subsets[name])
        pseudo = self._pseudo_sampler(idx)
        student = self._student_monitor(idx, pseudo, k)
        steps, lr = self.schedule(k)
        stage = "consolidate" if k > cfg.rounds else f"round {k}/{cfg.rounds}"
        teacher = self._teacher(idx)
        batches = self._batches(pseudo) if teacher is None else self._teacher_batches(idx)
        stats = train_steps(self.model, batches, steps=steps, lr=lr, rng=_rng(cfg.seed, k, _TRAIN),
                            consistency=teacher, **self._train_kwargs(f"{stage}: fine-tune", steps))
        if teacher is not None:
            self.teacher_state = teacher.state_dict()
        if cfg.init == "lineage" and relabel:
            self.lineages[relabel[0]] = {"model": model_name(k, cfg.rounds), "state": _state_copy(self.model)}
        student.update({key: stats[key] for key in ("pseudo_loss", "pseudo_first_loss", "pseudo_last_loss")})
        metrics = {"round": k, "stage": "consolidate" if k > cfg.rounds else "round", "method": cfg.method,
                   "model": model_name(k, cfg.rounds), "student_from": student_from, "trained_on": ["L", *train_on],
                   "train_labels_from": self._labels_from(train_on), "train": stats, "student": student}
        trained = self._premise_trained(idx) if relabel else {}
        metrics.update(self._relabel_subsets(relabel, model_name(k, cfg.rounds)))
        for name in train_on:
            metrics["monitor"].setdefault(name, {})["pre_loss"] = student["pre_loss"]
        metrics["premise"] = premise(trained, [metrics["monitor"][n] for n in relabel])
        return self._finish(metrics, start)

    def _teacher(self, idx: list[int]) -> MeanTeacher | None:
        """Mean Teacher: the EMA teacher, continued from the last round (a copy of M0 at first);
        its consistency ramp spans every round and the consolidation."""
        cfg = self.config
        if cfg.method != "mean-teacher" or not idx:
            return None
        if self.teacher_state is not None:
            return MeanTeacher.from_state(self.model, self.teacher_state)
        total = cfg.steps_per_round * (cfg.rounds + int(cfg.consolidate))
        return MeanTeacher(self.model, MeanTeacherConfig.from_value(cfg.mean_teacher), total_steps=total)

    def _teacher_batches(self, idx: list[int]) -> MixedBatches:
        """Labelled samples first, then patches of the unlabelled images ``idx`` (labels all ignored)."""
        cfg = self.config
        self._batches(None)  # builds the labelled sampler
        return mean_teacher_batches(self._labelled_sampler, [self.data.unlabelled[i].image for i in idx],
                                    cfg.batch_size, labelled_ratio=cfg.labelled_ratio,
                                    augment=AugmentConfig.from_value(cfg.augment))

    def schedule(self, k: int) -> tuple[int, float]:
        """``(steps, peak learning rate)`` of round ``k`` (0: the warm-up; ``rounds + 1``: the
        consolidation). A ``reinit`` student starts from theta0, so it gets the warm-up's full
        schedule; other students fine-tune for ``steps_per_round`` at ``round_lr`` (decayed)."""
        cfg = self.config
        if k == 0 or cfg.init == "reinit":
            return cfg.warmup_steps, cfg.lr
        return cfg.steps_per_round, cfg.round_lr * cfg.round_lr_decay ** (min(k, cfg.rounds) - 1)

    def run(self, *, resume: bool = False) -> list[dict[str, Any]]:
        """Warm-up (unless done) and all remaining rounds. Returns the metrics history.

        Args:
            resume: first load ``out_dir/checkpoint.pt`` when it exists.
        """
        if resume:
            self.resume()
        if self.round_index < 0:
            self.warmup()
        while self.round_index < self.config.rounds:
            self.round()
        if self.config.consolidate and self.round_index == self.config.rounds:
            self.consolidate()
        return self.history

    # ------------------------------------------------------------------ round helpers
    def _start_student(self, k: int, relabel: tuple[str, ...]) -> str:
        """Load the weights this round's student starts from; returns the model's name."""
        init = self.config.init
        if init == "reinit":
            self.model.load_state_dict(self.init_state)
            return "theta0"
        if init == "m0":
            self.model.load_state_dict(self.base_state)
            return "M0"
        if init == "lineage" and relabel:
            line = self.lineages.get(relabel[0])
            self.model.load_state_dict(self.base_state if line is None else line["state"])
            return "M0" if line is None else line["model"]
        return model_name(k - 1, self.config.rounds)  # continue (lineage: consolidation continues the last model)

    def _labels_from(self, train_on: Sequence[str]) -> dict[str, list[str]]:
        if self.config.method in ("oracle", "mean-teacher"):
            source = "truth" if self.config.method == "oracle" else "teacher"
            return {name: [source] for name in train_on}
        return {n: sorted({self.labelled_by[i] for i in self.subsets[n]}) for n in train_on}

    def _train_kwargs(self, phase: str | None = None, steps: int = 0) -> dict[str, Any]:
        cfg = self.config
        kwargs = {"optim": OptimConfig.from_value(cfg.optim), "ignore_index": cfg.ignore_index,
                  "device": cfg.device, "amp": cfg.amp, "channels_last": cfg.channels_last}
        if phase is not None and steps > 0:
            progress = Progress(f"{cfg.method} {phase}", steps, enabled=cfg.progress)
            kwargs["on_step"] = lambda done, run: progress.update(done)
        return kwargs

    def _sampler(self, images: list[np.ndarray], labels: list[np.ndarray]) -> PatchSampler:
        cfg = self.config
        return PatchSampler(images, labels, cfg.patch_size, num_classes=cfg.num_classes,
                            foreground_oversample=cfg.foreground_oversample, ignore_index=cfg.ignore_index)

    def _batches(self, pseudo: PatchSampler | None) -> MixedBatches:
        """Warm-up (round_index < 0): whole labelled batches; rounds: per method and config."""
        if self._labelled_sampler is None:
            cases = self.data.labelled
            self._labelled_sampler = self._sampler([c.image for c in cases], [c.label for c in cases])
        cfg = self.config
        matched = cfg.method == "supervised" and cfg.supervised_batch == "matched" and self.round_index >= 0
        soft = cfg.num_classes if self.soft and pseudo is not None and cfg.method != "oracle" else None
        return MixedBatches(self._labelled_sampler, pseudo, cfg.batch_size, labelled_ratio=cfg.labelled_ratio,
                            augment=AugmentConfig.from_value(cfg.augment), labelled_only=matched,
                            soft_channels=soft)

    def _pseudo_sampler(self, idx: list[int]) -> PatchSampler | None:
        """Sampler over the targets of ``idx``: the truth (oracle), else the pseudo labels with
        low-confidence voxels -> ignore_index (soft targets: probabilities as extra channels)."""
        if not idx:
            return None
        cfg, cases = self.config, self.data.unlabelled
        if cfg.method == "oracle":
            return self._sampler([cases[i].image for i in idx], [cases[i].label for i in idx])
        if cfg.method == "mean-teacher":
            return None  # no targets on U: the teacher's consistency term (see _teacher_batches)
        labels = []
        for i in idx:
            lab = self.pseudo[i].copy()
            lab[low_confidence(lab, self.confidence[i], cfg.threshold)] = cfg.ignore_index
            labels.append(lab)
        images = [cases[i].image for i in idx]
        if self.soft:
            images = [np.concatenate([img, self.probs[i].astype(np.float32)]) for img, i in zip(images, idx)]
        return self._sampler(images, labels)

    def _student_monitor(self, idx: list[int], pseudo: PatchSampler | None, k: int) -> dict[str, float]:
        """Before training: the student's loss on sampled target patches, and its hard Dice
        agreement with its targets over the whole training part (1.0: nothing left to learn)."""
        if pseudo is None:
            return {"pre_loss": math.nan, "start_agreement": math.nan}
        cfg = self.config
        preds = [r[0] for r in self.predict([self.data.unlabelled[i].image for i in idx])]
        _, agreement = pooled_dice(preds, pseudo.labels, cfg.num_classes, ignore_index=cfg.ignore_index)
        return {"pre_loss": self._pre_loss(pseudo, k), "start_agreement": agreement}

    def _premise_trained(self, idx: list[int]) -> dict[str, float]:
        """After fine-tuning, where the truth of the training part is known: the Dice of the labels
        the student trained on, of its own predictions there, and their agreement. The predictions
        are kept for a relabelling of the same cases by the same model (self-training)."""
        cfg = self.config
        truth = [self.data.unlabelled[i].label for i in idx]
        if not idx or any(t is None for t in truth) or cfg.method not in ("atso", "self-training"):
            return {}
        results = self.predict([self.data.unlabelled[i].image for i in idx])
        self._fresh = dict(zip(idx, results))
        preds, labels = [r[0] for r in results], [self.pseudo[i] for i in idx]
        c, ignore = cfg.num_classes, cfg.ignore_index
        return {"label_dice": pooled_dice(labels, truth, c, ignore_index=ignore)[1],
                "model_dice": pooled_dice(preds, truth, c, ignore_index=ignore)[1],
                "agreement": pooled_dice(preds, labels, c, ignore_index=ignore)[1]}

    def _pre_loss(self, pseudo: PatchSampler, k: int) -> float:
        """Loss of the student entering round k on (hard) target patches it is about to learn."""
        cfg = self.config
        if cfg.monitor_patches == 0:
            return math.nan
        rng = _rng(cfg.seed, k, _MONITOR)
        pairs = [pseudo.sample(rng) for _ in range(cfg.monitor_patches)]
        pairs = [(image[:cfg.in_channels], label) for image, label in pairs]
        return mean_loss(self.model, pairs, ignore_index=cfg.ignore_index, device=cfg.device)

    # ------------------------------------------------------------------ prediction and monitors
    def predict(self, volumes: Sequence[np.ndarray]) -> list[tuple[np.ndarray, ...]]:
        """Run ``relabel_fn`` on normalised ``(M, Z, Y, X)`` volumes with the model in eval mode.

        Returns:
            ``(labels uint8, confidence uint8)`` per volume, plus ``probabilities (C, Z, Y, X)``
            float16 when the run uses soft targets.

        Raises:
            ValueError: the relabel function returned the wrong count, shapes, or no probabilities
                for soft targets.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.relabel_fn(self.model, list(volumes))
        finally:
            self.model.train(was_training)
        if len(out) != len(volumes):
            raise ValueError(f"relabel_fn returned {len(out)} results for {len(volumes)} volumes")
        results = []
        for res, vol in zip(out, volumes):
            labels, conf = res[0], res[1]
            if labels.shape != vol.shape[1:] or conf.shape != vol.shape[1:]:
                raise ValueError(f"relabel_fn returned shapes {labels.shape}, {conf.shape} for a volume {vol.shape}")
            item: tuple[np.ndarray, ...] = (np.asarray(labels, np.uint8), np.asarray(conf, np.uint8))
            if self.soft:
                if len(res) < 3 or res[2] is None or tuple(res[2].shape) != (self.config.num_classes, *vol.shape[1:]):
                    raise ValueError("targets='soft' needs a relabel_fn returning (labels, confidence, probabilities "
                                     f"(C={self.config.num_classes}, *spatial)) for a volume {vol.shape}")
                item += (np.asarray(res[2], np.float16),)
            results.append(item)
        return results

    def _relabel_subsets(self, names: Sequence[str], model_id: str) -> dict[str, Any]:
        """Relabel the named subsets with the current model; per-subset monitor statistics."""
        monitor: dict[str, dict[str, Any]] = {}
        start = time.perf_counter()
        fresh, self._fresh = self._fresh, {}
        for name in names:
            idx = self.subsets[name]
            todo = [i for i in idx if i not in fresh]
            if todo:
                fresh.update(zip(todo, self.predict([self.data.unlabelled[i].image for i in todo])))
            results = [fresh[i] for i in idx]
            monitor[name] = self._pseudo_stats(idx, results)
            for i, res in zip(idx, results):
                self.pseudo[i], self.confidence[i], self.labelled_by[i] = res[0], res[1], model_id
                if self.soft:
                    self.probs[i] = res[2]
        voxels = sum(self.data.unlabelled[i].image[0].size for n in names for i in self.subsets[n])
        seconds = time.perf_counter() - start
        return {"relabelled": list(names), "relabelled_by": model_id if names else None, "monitor": monitor,
                "relabel": {"seconds": seconds, "voxels": voxels}, "pseudo_dice_all": self._pseudo_dice_all()}

    def _pseudo_stats(self, idx: list[int], results: list[tuple[np.ndarray, ...]]) -> dict[str, Any]:
        """Label change (all voxels; foreground only, since the last labels and since M0's),
        confidence, ignored share and, with known truth, the new labels' pooled Dice."""
        cfg = self.config
        labels = [r[0] for r in results]
        total = sum(lab.size for lab in labels)
        old = [self.pseudo[i] for i in idx]
        m0 = [self.m0_labels[i] for i in idx]
        has_old, has_m0 = all(o is not None for o in old), all(o is not None for o in m0)
        changed = sum(int(np.count_nonzero(lab != o)) for lab, o in zip(labels, old)) if has_old else 0
        ignored = sum(int(np.count_nonzero(low_confidence(r[0], r[1], cfg.threshold) | (r[0] == cfg.ignore_index)))
                      for r in results)
        stats = {"changed_fraction": changed / total if has_old else math.nan,
                 "changed_fg": foreground_change(old, labels, ignore_index=cfg.ignore_index) if has_old else math.nan,
                 "changed_fg_m0": foreground_change(m0, labels, ignore_index=cfg.ignore_index) if has_m0 else math.nan,
                 "mean_confidence": sum(float(r[1].sum(dtype=np.float64)) for r in results) / (255.0 * total),
                 "ignored_fraction": ignored / total}
        truth = [self.data.unlabelled[i].label for i in idx]
        if all(t is not None for t in truth):
            _, stats["pseudo_dice"] = pooled_dice(labels, truth, cfg.num_classes, ignore_index=cfg.ignore_index)
            if has_old:
                _, stats["pseudo_dice_before"] = pooled_dice(old, truth, cfg.num_classes, ignore_index=cfg.ignore_index)
        return stats

    def _pseudo_dice_all(self) -> float:
        """Pooled Dice of the current pseudo labels of every case with truth (relabelling methods)."""
        pairs = [(p, c.label) for p, c in zip(self.pseudo, self.data.unlabelled)
                 if p is not None and c.label is not None]
        if not pairs or self.config.method not in ("atso", "self-training"):
            return math.nan
        return pooled_dice([p for p, _ in pairs], [t for _, t in pairs], self.config.num_classes,
                           ignore_index=self.config.ignore_index)[1]

    def evaluate(self, cases: Sequence[Case]) -> dict[str, Any]:
        """Dice of the current model on labelled ``cases``: pooled per class over them, and per
        case (Dice and HD95 mean +- SD per class, :func:`~atso_fast.train.metrics.case_metrics`).

        Returns:
            ``{"dice": [C floats], "mean_dice": mean over foreground classes, "cases": per-case
            metrics}`` (NaN and no ``cases`` without cases).
        """
        if not cases:
            return {"dice": [], "mean_dice": math.nan}
        preds = [r[0] for r in self.predict([c.image for c in cases])]
        cfg = self.config
        per_class, mean_fg = pooled_dice(preds, [c.label for c in cases], cfg.num_classes,
                                         ignore_index=cfg.ignore_index)
        maps = [(as_case_maps(p, cfg.spacing), as_case_maps(c.label, cfg.spacing)) for p, c in zip(preds, cases)]
        per_case = case_metrics([p[0] for p, _ in maps], [t[0] for _, t in maps], cfg.num_classes,
                                spacing=[p[1] or [1.0] * p[0].ndim for p, _ in maps], ignore_index=cfg.ignore_index)
        return {"dice": per_class, "mean_dice": mean_fg, "cases": per_case}

    def validate(self) -> dict[str, Any]:
        """The current model on the validation cases: pooled Dice per class and its foreground
        mean, and the per-case summary (Dice and HD95 mean +- SD per class)."""
        result = self.evaluate(self.data.val)
        out = {"val_dice": result["dice"], "val_mean_dice": result["mean_dice"]}
        if "cases" in result:
            out["val_cases"] = case_summary(result["cases"])
        return out

    def _say_round(self, metrics: dict[str, Any]) -> None:
        """One line per finished round: loss, validation Dice, time, and the run's ETA from the
        rounds so far (a warm-up counts as one)."""
        if not self.config.progress:
            return
        done = [m["seconds"] for m in self.history if m.get("round", 0) > 0]
        left = self.config.rounds + int(self.config.consolidate) - metrics["round"]
        eta = (sum(done) / len(done) if done else metrics["seconds"]) * left
        dice = metrics.get("val_mean_dice")
        loss = metrics["train"].get("loss")
        stage = metrics["stage"] if metrics["stage"] != "round" else f"round {metrics['round']}"
        print(f"atso-fast: {self.config.method} {stage}"
              f" done in {duration(metrics['seconds'])}: train loss {'-' if loss is None else f'{loss:.4f}'}, "
              f"val mean Dice {'-' if dice is None else f'{dice:.4f}'}; {left} stage(s) left, ETA {duration(eta)}",
              file=sys.stderr, flush=True)

    def _finish(self, metrics: dict[str, Any], start: float) -> dict[str, Any]:
        metrics.update(self.validate())
        metrics["seconds"] = time.perf_counter() - start
        metrics = _nan_to_none(metrics)
        self.round_index += 1
        self.history.append(metrics)
        log.info("%s round %d: train loss %s, val mean Dice %s, %.1f s", self.config.method, metrics["round"],
                 metrics["train"]["loss"], metrics["val_mean_dice"], metrics["seconds"])
        self._say_round(metrics)
        if self.config.out_dir is not None:
            self.save_checkpoint()
        for fn in self.callbacks:
            fn(self, metrics)
        return metrics

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: tensors and plain containers only (``weights_only`` safe)."""
        return {"format_version": _FORMAT_VERSION, "round": self.round_index, "method": self.config.method,
                "config": self.config.to_dict(), "subsets": {k: list(v) for k, v in self.subsets.items()},
                "model": _state_copy(self.model), "base_model": self.base_state, "init_model": self.init_state,
                "pseudo": _tensors(self.pseudo), "confidence": _tensors(self.confidence),
                "probs": _tensors(self.probs) if any(p is not None for p in self.probs) else None,
                "m0_labels": _tensors(self.m0_labels), "labelled_by": list(self.labelled_by),
                "lineages": {k: dict(v) for k, v in self.lineages.items()}, "teacher": self.teacher_state,
                "history": json.loads(json.dumps(self.history))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. A warm-up state (round 0) may seed any method that needs
        no more pseudo labels (or probabilities) than it holds; later states need the same method.

        Raises:
            ValueError: wrong format, method, split, case count, normalisation, or missing
                pseudo labels or probabilities.
        """
        self._check_state(state)
        n = len(self.data.unlabelled)
        self.model.load_state_dict(state["model"])
        self.base_state, self.init_state = state["base_model"], state["init_model"]
        self._fresh = {}
        self.pseudo = _arrays(state["pseudo"], n)
        self.confidence = _arrays(state["confidence"], n)
        self.probs = _arrays(state["probs"], n) if self.soft else [None] * n
        self.m0_labels = _arrays(state["m0_labels"], n)
        self.labelled_by = list(state["labelled_by"])
        self.lineages = {k: dict(v) for k, v in state["lineages"].items()} if state["round"] > 0 else {}
        self.teacher_state = state["teacher"] if state["round"] > 0 else None
        self.history = [dict(h) for h in state["history"]]
        if state["method"] != self.config.method and self.history:  # a shared warm-up
            self.history[0].update(method=self.config.method, warmup_from=state["method"])
        self.round_index = int(state["round"])

    def _check_state(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported ATSO state format {state.get('format_version')!r} "
                             f"(this version reads {_FORMAT_VERSION})")
        if state["round"] > 0 and (state["method"], state["config"]["init"]) != (self.config.method, self.config.init):
            raise ValueError(f"state of method {state['method']!r} (init {state['config']['init']!r}) at round "
                             f"{state['round']} cannot resume method {self.config.method!r} "
                             f"(init {self.config.init!r})")
        if len(state["pseudo"]) != len(self.data.unlabelled):
            raise ValueError(f"state has {len(state['pseudo'])} unlabelled cases, data has {len(self.data.unlabelled)}")
        if state["config"]["normalization"] != self.config.to_dict()["normalization"]:
            raise ValueError(f"state normalization {state['config']['normalization']} differs from "
                             f"{self.config.normalization}")
        needed = [i for idx in self.subsets.values() for i in idx] \
            if self.config.method not in ("oracle", "mean-teacher") else []
        missing = [i for i in needed if state["pseudo"][i] is None]
        if state["round"] >= 0 and missing:
            raise ValueError(f"state lacks pseudo labels for unlabelled cases {missing[:5]}")
        probs = state.get("probs") or [None] * len(state["pseudo"])
        if self.soft and state["round"] >= 0 and any(probs[i] is None for i in needed):
            raise ValueError("state lacks the probabilities that soft targets need (run the warm-up with "
                             "targets='soft', as run_methods does when any run uses them)")
        if state["round"] > 0 and state["subsets"] != self.subsets:
            raise ValueError("state split differs from this run's split (different seed or data)")

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Atomically write :meth:`state_dict` (default ``out_dir/checkpoint.pt``) and rewrite
        ``metrics.jsonl`` and its curves ``metrics.png`` from the history, so they always agree."""

        folder = Path(self.config.out_dir) if path is None else Path(path).parent
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        target = atomic_write_bytes(folder / CHECKPOINT_NAME if path is None else Path(path), buffer.getbuffer())
        lines = "".join(json.dumps(h) + "\n" for h in self.history)
        atomic_write_bytes(folder / METRICS_NAME, lines.encode())
        atomic_write_bytes(folder / CURVES_NAME, curves_png(self.history, f"{self.config.method}: {folder.name}"))
        return target

    def resume(self, path: str | Path | None = None) -> bool:
        """Load ``path`` (default ``out_dir/checkpoint.pt``) if it exists. Returns whether it did."""
        if path is None:
            if self.config.out_dir is None:
                raise ValueError("resume needs config.out_dir or an explicit checkpoint path")
            path = Path(self.config.out_dir) / CHECKPOINT_NAME
        if not os.path.lexists(path):
            return False
        self.load_state_dict(load_checkpoint_file(path))
        log.info("resumed %s from %s at round %d", self.config.method, path, self.round_index)
        return True
