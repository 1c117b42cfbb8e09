"""Asynchronous teacher-student optimisation (ATSO) and its baselines, in one code path.

ATSO: a supervised warm-up on the labelled set L gives M0, which pseudo-labels both halves U1, U2
of a fixed, seeded, voxel-balanced split of the unlabelled set U. Round k fine-tunes the model on
L + pseudo(Ua) (``a = U1`` for odd k, ``U2`` for even k) and then relabels the *other* half Ub
with the fine-tuned model M_k. A model therefore never relabels the subset it was just
fine-tuned on, which breaks the "lazy learning" of plain self-training (where M_k reproduces the
labels it was just trained to mimic).

Baselines (same rounds, steps, learning rates and sampling):
    ``method="supervised"``    fine-tune on L only.
    ``method="self-training"`` fine-tune on L + pseudo(U), then relabel all of U with that model.

Every random choice of round k comes from generators seeded by ``(seed, k, purpose)``, and the
optimiser is created fresh each round, so a run resumed from the checkpoint of round k gives
exactly the tensors of an uninterrupted run (same device and thread count).

The relabel step is a callable ``relabel_fn(model, volumes) -> [(labels, confidence), ...]`` with
volumes ``(M, Z, Y, X)`` float32 *already normalised*, labels ``(Z, Y, X)`` uint8 and confidence
``(Z, Y, X)`` uint8 (max probability * 255). The default runs ``atso_fast.engine.Relabeler``.
"""
from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from atso_fast.engine.relabeler import Relabeler
from atso_fast.io import atomic_write_bytes
from atso_fast.train.augment import AugmentConfig
from atso_fast.train.data import (
    PatchSampler,
    SemiSupervisedData,
    load_raw,
    prepare_data,
    resolve_normalization,
)
from atso_fast.train.losses import dice_per_class
from atso_fast.train.trainer import MixedBatches, OptimConfig, mean_loss, train_steps
from atso_fast.train.unet import UNet

__all__ = [
    "METHODS",
    "ATSOConfig",
    "ATSO",
    "RelabelFn",
    "split_balanced",
    "plan_round",
    "build_model",
    "default_relabel_fn",
    "direct_relabel_fn",
    "load_data",
    "run_methods",
    "CHECKPOINT_NAME",
    "METRICS_NAME",
]

log = logging.getLogger(__name__)

METHODS = ("atso", "self-training", "supervised")
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
_FORMAT_VERSION = 1
_TRAIN, _MONITOR, _SPLIT = 1, 2, 3  # rng purposes

RelabelFn = Callable[[nn.Module, Sequence[np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]
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
        method: ``"atso"``, ``"self-training"`` or ``"supervised"``.
        rounds: fine-tuning rounds after the warm-up.
        warmup_steps: supervised steps giving M0.
        steps_per_round: fine-tuning steps per round.
        lr: warm-up peak learning rate.
        round_lr: peak learning rate of round 1; round k uses ``round_lr * round_lr_decay ** (k-1)``.
        round_lr_decay: per-round learning-rate factor.
        optim: :class:`~atso_fast.train.trainer.OptimConfig` fields (optimizer, schedule, ...).
        threshold: pseudo-label voxels with max probability below it are ignored in the loss.
        ignore_index: label of ignored voxels (>= num_classes, <= 255).
        init: ``"continue"`` (round k starts from M_{k-1}) or ``"base"`` (from M0).
        labelled_ratio: fraction of each batch drawn from L during fine-tuning.
        foreground_oversample: probability of a foreground-centred patch.
        augment: True/False or :class:`~atso_fast.train.augment.AugmentConfig` fields.
        relabel: extra options of ``Relabeler.from_module`` (overlap, batch_size, ...).
        monitor_patches: patches used for the loss-before-fine-tuning monitor.
        seed: seeds model init, split, sampling and augmentation.
        device: torch device string.
        amp: fp16 autocast on CUDA.
        channels_last: channels-last memory format on CUDA.
        out_dir: where ``checkpoint.pt`` and ``metrics.jsonl`` go (None: keep nothing on disk).
        spacing: ``(z, y, x)`` mm the model trains at, recorded in exported packages (relabelling
            then resamples scans to it); None: the labelled files' own spacing when they agree.
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
    threshold: float = 0.0
    ignore_index: int = 255
    init: str = "continue"
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

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.init not in ("continue", "base"):
            raise ValueError(f"init must be 'continue' or 'base', got {self.init!r}")
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
        for name in ("threshold", "labelled_ratio", "foreground_oversample"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not (self.lr > 0 and self.round_lr > 0 and self.round_lr_decay > 0):
            raise ValueError(f"lr, round_lr and round_lr_decay must be > 0, got {self.lr}, {self.round_lr}, "
                             f"{self.round_lr_decay}")
        if self.in_channels < 1 or self.batch_size < 1:
            raise ValueError(f"in_channels and batch_size must be >= 1, got {self.in_channels}, {self.batch_size}")
        OptimConfig.from_value(self.optim)
        AugmentConfig.from_value(self.augment)

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


def split_balanced(sizes: Sequence[int], seed: int) -> tuple[list[int], list[int]]:
    """Split case indices into two halves with about equal voxel counts.

    Cases are shuffled by ``seed``, stably sorted by size (largest first), and each goes to the
    half with fewer voxels (then fewer cases). Deterministic for a given ``(sizes, seed)``; the two
    voxel totals differ by at most the largest case.

    Args:
        sizes: voxel count of each case (>= 2 cases).
        seed: split seed.

    Returns:
        ``(U1, U2)`` sorted index lists, both non-empty.

    Raises:
        ValueError: fewer than 2 cases or a negative size.
    """
    if len(sizes) < 2 or min(sizes) < 0:
        raise ValueError(f"split_balanced needs >= 2 non-negative sizes, got {list(sizes)}")
    order = np.random.default_rng([int(seed), _SPLIT]).permutation(len(sizes))
    order = sorted(order.tolist(), key=lambda i: -int(sizes[i]))
    halves: tuple[list[int], list[int]] = ([], [])
    loads = [0, 0]
    for i in order:
        h = 0 if (loads[0], len(halves[0])) <= (loads[1], len(halves[1])) else 1
        halves[h].append(i)
        loads[h] += int(sizes[i])
    return sorted(halves[0]), sorted(halves[1])


def plan_round(method: str, k: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Which pseudo-labelled subsets round ``k`` (>= 1) trains on, and which it relabels after.

    ``atso``: odd k trains on U1 and relabels U2, even k the reverse. ``self-training``: U and U.
    ``supervised``: nothing and nothing.
    """
    if k < 1 or method not in METHODS:
        raise ValueError(f"plan_round needs k >= 1 and method in {METHODS}, got k={k}, method={method!r}")
    if method == "atso":
        return (("U1",), ("U2",)) if k % 2 else (("U2",), ("U1",))
    if method == "self-training":
        return ("U",), ("U",)
    return (), ()


def build_model(config: ATSOConfig) -> UNet:
    """The config's U-Net, initialised from ``config.seed`` without touching torch's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = UNet(config.in_channels, config.num_classes, spatial_dims=config.spatial_dims, **config.model)
    if any(p % model.divisor for p in config.patch_size):
        raise ValueError(f"patch_size {config.patch_size} must be multiples of {model.divisor} for depth {model.depth}")
    return model


def default_relabel_fn(config: ATSOConfig) -> RelabelFn:
    """A ``relabel_fn`` running the relabel engine (``Relabeler.from_module``) on the live model.

    The engine window is ``config.patch_size``; volumes are passed with ``normalized=True`` (they
    are normalised already), confidence thresholding is left to the trainer (engine threshold 0).
    """
    def relabel(model: nn.Module, volumes: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:

        engine = Relabeler.from_module(
            model, window=config.patch_size, num_classes=config.num_classes, kind="logits",
            normalization=config.normalization if isinstance(config.normalization, dict) else None,
            in_channels=config.in_channels, device=config.device,
            **{"threshold": 0.0, "ignore_index": config.ignore_index, **config.relabel})
        results = [engine.relabel_volume(v[0] if v.shape[0] == 1 else v, normalized=True) for v in volumes]
        return [(r.labels, r.confidence) for r in results]

    return relabel


def direct_relabel_fn(config: ATSOConfig, *, batch_size: int = 8) -> RelabelFn:
    """A ``relabel_fn`` that runs the model on whole volumes (3D) or whole slices (2D) at once.

    No sliding window: each volume is zero-padded at the far end to a multiple of the model's
    ``divisor`` (when it has one) and cropped back. Meant for small volumes, tests and quick
    experiments; large volumes belong to the relabel engine (:func:`default_relabel_fn`).
    """
    device = torch.device(config.device)

    @torch.no_grad()
    def relabel(model: nn.Module, volumes: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        div = int(getattr(model, "divisor", 1))
        out = []
        for vol in volumes:
            x = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))
            x = x.movedim(1, 0) if config.spatial_dims == 2 else x[None]  # (B, M, *spatial)
            spatial = x.shape[2:]
            pad = [a for s in reversed(spatial) for a in (0, -s % div)]
            x = torch.nn.functional.pad(x, pad)
            probs = torch.cat([torch.softmax(model(x[i:i + batch_size].to(device)).float(), 1).cpu()
                               for i in range(0, x.shape[0], batch_size)])
            probs = probs[(slice(None), slice(None), *(slice(0, s) for s in spatial))]
            conf, labels = probs.max(1)
            if config.spatial_dims == 3:
                conf, labels = conf[0], labels[0]
            out.append((labels.numpy().astype(np.uint8), (conf * 255).round().numpy().astype(np.uint8)))
        return out

    return relabel


def load_data(config: ATSOConfig | dict[str, Any]) -> SemiSupervisedData:
    """Read and normalise ``config.data`` with ``config.normalization`` (resolved here).

    Raises:
        ValueError: no ``data`` in the config, or see :func:`~atso_fast.train.data.load_raw`.
    """
    config = ATSOConfig.coerce(config)
    if config.data is None:
        raise ValueError("ATSO needs data: set config.data (folder, list file or dict) or pass data=")
    raw, modality = load_raw(config.data, in_channels=config.in_channels)
    policy = resolve_normalization(config.normalization, raw["labelled"], modality)
    return prepare_data(raw, policy, modality)


def run_methods(config: ATSOConfig | dict[str, Any],
                methods: Sequence[str] | Mapping[str, dict[str, Any]] = METHODS, *,
                data: SemiSupervisedData | None = None, relabeler: RelabelFn | None = None,
                callbacks: Sequence[Callback] = ()) -> dict[str, ATSO]:
    """Run several methods (or variants) from one shared warm-up, for paired comparisons.

    The warm-up (M0 and its pseudo labels for all of U) runs once, as ``"atso"`` (with one
    unlabelled case as ``"self-training"``, with none as ``"supervised"``), and its state seeds
    every run. With ``config.out_dir`` set, the warm-up checkpoint goes to ``out_dir/warmup`` and
    each run writes to ``out_dir/<name>``.

    Args:
        config: the shared settings.
        methods: method names, or run names mapped to :class:`ATSOConfig` overrides, e.g.
            ``{"atso t=0.9": {"method": "atso", "threshold": 0.9}}``. Overrides should change only
            round settings (threshold, init, round_lr, ...): the warm-up is computed once, with
            ``config``.
        data, relabeler, callbacks: as for :class:`ATSO`.

    Returns:
        the finished :class:`ATSO` runs by name, in the given order.

    Raises:
        ValueError: unknown method or override, or see :class:`ATSO`.
    """
    config = ATSOConfig.coerce(config)
    plans = _method_plans(methods)
    data = data if data is not None else load_data(config)
    n = len(data.unlabelled)
    warm_run = ATSO(replace(config, method="atso" if n >= 2 else "self-training" if n == 1 else "supervised",
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


def _mean_dice(cases_pred: Sequence[np.ndarray], cases_truth: Sequence[np.ndarray], num_classes: int,
               ignore_index: int) -> tuple[list[float], float]:
    """Per-class Dice averaged over cases (NaN classes skipped) and its foreground mean."""
    if not cases_pred:
        return [], math.nan
    scores = np.stack([dice_per_class(p, t, num_classes, ignore_index=ignore_index)
                       for p, t in zip(cases_pred, cases_truth)])
    with np.errstate(all="ignore"):
        counts = np.sum(~np.isnan(scores), axis=0)
        per_class = np.where(counts > 0, np.nansum(scores, axis=0) / np.maximum(counts, 1), np.nan)
    fg = per_class[1:][~np.isnan(per_class[1:])]
    return [float(v) for v in per_class], float(fg.mean()) if fg.size else math.nan


class ATSO:
    """ATSO / self-training / supervised fine-tuning, round by round, with checkpoints.

    Args:
        config: :class:`ATSOConfig` or a dict of its fields.
        model: any ``nn.Module`` mapping ``(B, M, *patch)`` to logits ``(B, C, *patch)``; default a
            :class:`~atso_fast.train.unet.UNet` from ``config.model``.
        relabeler: ``relabel_fn(model, volumes)`` (see module docstring); default
            :func:`default_relabel_fn`.
        data: :class:`~atso_fast.train.data.SemiSupervisedData`; default loaded from ``config.data``.
        callbacks: ``fn(atso, metrics)`` called after the warm-up and after every round.

    Raises:
        ValueError: bad config, no data, too few unlabelled cases for the method.
    """

    def __init__(self, config: ATSOConfig | dict[str, Any], model: nn.Module | None = None,
                 relabeler: RelabelFn | None = None, *, data: SemiSupervisedData | None = None,
                 callbacks: Sequence[Callback] = ()) -> None:
        config = ATSOConfig.coerce(config)
        self.data = data if data is not None else load_data(config)
        self.config = replace(config, normalization=dict(self.data.normalization),
                              spacing=config.spacing if config.spacing is not None else self.data.spacing)
        self.model = model if model is not None else build_model(self.config)
        self.relabel_fn = relabeler if relabeler is not None else default_relabel_fn(self.config)
        self.callbacks = list(callbacks)
        self.subsets = self._make_subsets()
        self.round_index = -1
        self.pseudo: list[np.ndarray | None] = [None] * len(self.data.unlabelled)
        self.confidence: list[np.ndarray | None] = [None] * len(self.data.unlabelled)
        self.labelled_by: list[str | None] = [None] * len(self.data.unlabelled)
        self.history: list[dict[str, Any]] = []
        self.base_state: dict[str, torch.Tensor] | None = None
        self._labelled_sampler: PatchSampler | None = None

    def _make_subsets(self) -> dict[str, list[int]]:
        n = len(self.data.unlabelled)
        if self.config.method == "supervised":
            return {}
        if self.config.method == "self-training":
            if n < 1:
                raise ValueError("method 'self-training' needs at least 1 unlabelled case, got 0")
            return {"U": list(range(n))}
        if n < 2:
            raise ValueError(f"method 'atso' needs at least 2 unlabelled cases to split, got {n}")
        u1, u2 = split_balanced([c.image[0].size for c in self.data.unlabelled], self.config.seed)
        return {"U1": u1, "U2": u2}

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
                            rng=_rng(cfg.seed, 0, _TRAIN), **self._train_kwargs())
        self.base_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        metrics = {"round": 0, "method": cfg.method, "model": "M0", "trained_on": ["L"],
                   "train_labels_from": {}, "train": stats}
        metrics.update(self._relabel_subsets(tuple(self.subsets), "M0"))
        return self._finish(metrics, start)

    def round(self) -> dict[str, Any]:
        """Run the next round (fine-tune, then relabel per :func:`plan_round`). Returns metrics."""
        cfg = self.config
        if self.round_index < 0:
            raise RuntimeError("call warmup() before round()")
        if self.round_index >= cfg.rounds:
            raise RuntimeError(f"all {cfg.rounds} rounds are done")
        k, start = self.round_index + 1, time.perf_counter()
        train_on, relabel = plan_round(cfg.method, k)
        if cfg.init == "base":
            self.model.load_state_dict(self.base_state)
        idx = sorted(i for name in train_on for i in self.subsets[name])
        pseudo = self._pseudo_sampler(idx)
        monitor = {name: {"pre_loss": self._pre_loss(pseudo, k)} for name in train_on}
        lr = cfg.round_lr * cfg.round_lr_decay ** (k - 1)
        stats = train_steps(self.model, self._batches(pseudo), steps=cfg.steps_per_round, lr=lr,
                            rng=_rng(cfg.seed, k, _TRAIN), **self._train_kwargs())
        metrics = {"round": k, "method": cfg.method, "model": f"M{k}", "trained_on": ["L", *train_on],
                   "train_labels_from": {n: sorted({self.labelled_by[i] for i in self.subsets[n]}) for n in train_on},
                   "train": stats}
        metrics.update(self._relabel_subsets(relabel, f"M{k}"))
        for name, values in monitor.items():
            metrics["monitor"].setdefault(name, {}).update(values)
        return self._finish(metrics, start)

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
        return self.history

    # ------------------------------------------------------------------ helpers
    def _train_kwargs(self) -> dict[str, Any]:
        cfg = self.config
        return {"optim": OptimConfig.from_value(cfg.optim), "ignore_index": cfg.ignore_index,
                "device": cfg.device, "amp": cfg.amp, "channels_last": cfg.channels_last}

    def _sampler(self, images: list[np.ndarray], labels: list[np.ndarray]) -> PatchSampler:
        cfg = self.config
        return PatchSampler(images, labels, cfg.patch_size, num_classes=cfg.num_classes,
                            foreground_oversample=cfg.foreground_oversample, ignore_index=cfg.ignore_index)

    def _batches(self, pseudo: PatchSampler | None) -> MixedBatches:
        if self._labelled_sampler is None:
            cases = self.data.labelled
            self._labelled_sampler = self._sampler([c.image for c in cases], [c.label for c in cases])
        cfg = self.config
        return MixedBatches(self._labelled_sampler, pseudo, cfg.batch_size, labelled_ratio=cfg.labelled_ratio,
                            augment=AugmentConfig.from_value(cfg.augment))

    def _pseudo_sampler(self, idx: list[int]) -> PatchSampler | None:
        """Sampler over the pseudo labels of ``idx``; low-confidence voxels -> ignore_index."""
        if not idx:
            return None
        cfg = self.config
        labels = []
        for i in idx:
            lab = self.pseudo[i].copy()
            lab[self.confidence[i] < cfg.threshold * 255.0] = cfg.ignore_index
            labels.append(lab)
        return self._sampler([self.data.unlabelled[i].image for i in idx], labels)

    def _pre_loss(self, pseudo: PatchSampler | None, k: int) -> float:
        """Loss of the model entering round k on the pseudo labels it is about to learn."""
        if pseudo is None or self.config.monitor_patches == 0:
            return math.nan
        rng = _rng(self.config.seed, k, _MONITOR)
        pairs = [pseudo.sample(rng) for _ in range(self.config.monitor_patches)]
        return mean_loss(self.model, pairs, ignore_index=self.config.ignore_index, device=self.config.device)

    def predict(self, volumes: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Run ``relabel_fn`` on normalised ``(M, Z, Y, X)`` volumes with the model in eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.relabel_fn(self.model, list(volumes))
        finally:
            self.model.train(was_training)
        if len(out) != len(volumes):
            raise ValueError(f"relabel_fn returned {len(out)} results for {len(volumes)} volumes")
        for (labels, conf), vol in zip(out, volumes):
            if labels.shape != vol.shape[1:] or conf.shape != vol.shape[1:]:
                raise ValueError(f"relabel_fn returned shapes {labels.shape}, {conf.shape} for a volume {vol.shape}")
        return [(np.asarray(lab, np.uint8), np.asarray(conf, np.uint8)) for lab, conf in out]

    def _relabel_subsets(self, names: Sequence[str], model_id: str) -> dict[str, Any]:
        """Relabel the named subsets with the current model; per-subset monitor statistics."""
        monitor: dict[str, dict[str, Any]] = {}
        start = time.perf_counter()
        for name in names:
            idx = self.subsets[name]
            results = self.predict([self.data.unlabelled[i].image for i in idx])
            monitor[name] = self._pseudo_stats(idx, results)
            for i, (labels, conf) in zip(idx, results):
                self.pseudo[i], self.confidence[i], self.labelled_by[i] = labels, conf, model_id
        voxels = sum(self.data.unlabelled[i].image[0].size for n in names for i in self.subsets[n])
        seconds = time.perf_counter() - start
        return {"relabelled": list(names), "relabelled_by": model_id if names else None, "monitor": monitor,
                "relabel": {"seconds": seconds, "voxels": voxels}}

    def _pseudo_stats(self, idx: list[int], results: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
        cfg = self.config
        total = sum(lab.size for lab, _ in results)
        changed = sum(int(np.count_nonzero(lab != self.pseudo[i])) for i, (lab, _) in zip(idx, results)
                      if self.pseudo[i] is not None)
        had_old = any(self.pseudo[i] is not None for i in idx)
        ignored = sum(int(np.count_nonzero((conf < cfg.threshold * 255.0) | (lab == cfg.ignore_index)))
                      for lab, conf in results)
        stats = {"changed_fraction": changed / total if had_old else math.nan,
                 "mean_confidence": sum(float(c.sum(dtype=np.float64)) for _, c in results) / (255.0 * total),
                 "ignored_fraction": ignored / total}
        truth = [self.data.unlabelled[i].label for i in idx]
        if all(t is not None for t in truth):
            _, stats["pseudo_dice"] = _mean_dice([r[0] for r in results], truth, cfg.num_classes, cfg.ignore_index)
        return stats

    def validate(self) -> dict[str, Any]:
        """Dice of the current model on the validation cases: per class and foreground mean."""
        cases = self.data.val
        if not cases:
            return {"val_dice": [], "val_mean_dice": math.nan}
        preds = [p for p, _ in self.predict([c.image for c in cases])]
        per_class, mean_fg = _mean_dice(preds, [c.label for c in cases], self.config.num_classes,
                                        self.config.ignore_index)
        return {"val_dice": per_class, "val_mean_dice": mean_fg}

    def _finish(self, metrics: dict[str, Any], start: float) -> dict[str, Any]:
        metrics.update(self.validate())
        metrics["seconds"] = time.perf_counter() - start
        metrics = _nan_to_none(metrics)
        self.round_index += 1
        self.history.append(metrics)
        log.info("%s round %d: train loss %s, val mean Dice %s, %.1f s", self.config.method, metrics["round"],
                 metrics["train"]["loss"], metrics["val_mean_dice"], metrics["seconds"])
        if self.config.out_dir is not None:
            self.save_checkpoint()
        for fn in self.callbacks:
            fn(self, metrics)
        return metrics

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: tensors and plain containers only (``weights_only`` safe)."""
        def tensors(arrays: list[np.ndarray | None]) -> list[torch.Tensor | None]:
            return [None if a is None else torch.from_numpy(np.ascontiguousarray(a).copy()) for a in arrays]

        return {"format_version": _FORMAT_VERSION, "round": self.round_index, "method": self.config.method,
                "config": self.config.to_dict(), "subsets": {k: list(v) for k, v in self.subsets.items()},
                "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "base_model": self.base_state, "pseudo": tensors(self.pseudo),
                "confidence": tensors(self.confidence), "labelled_by": list(self.labelled_by),
                "history": json.loads(json.dumps(self.history))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. A warm-up state (round 0) may seed any method that needs
        no more pseudo labels than it holds; later states need the same method.

        Raises:
            ValueError: wrong format, method, split, case count or normalisation.
        """
        if state.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported ATSO state format {state.get('format_version')!r}")
        if state["round"] > 0 and state["method"] != self.config.method:
            raise ValueError(f"state of method {state['method']!r} at round {state['round']} cannot resume "
                             f"method {self.config.method!r}")
        if len(state["pseudo"]) != len(self.data.unlabelled):
            raise ValueError(f"state has {len(state['pseudo'])} unlabelled cases, data has {len(self.data.unlabelled)}")
        if state["config"]["normalization"] != self.config.to_dict()["normalization"]:
            raise ValueError(f"state normalization {state['config']['normalization']} differs from "
                             f"{self.config.normalization}")
        missing = [i for n, idx in self.subsets.items() for i in idx if state["pseudo"][i] is None]
        if state["round"] >= 0 and missing:
            raise ValueError(f"state lacks pseudo labels for unlabelled cases {missing[:5]}")
        if state["round"] > 0 and state["subsets"] != self.subsets:
            raise ValueError("state split differs from this run's split (different seed or data)")
        self.model.load_state_dict(state["model"])
        self.base_state = state["base_model"]
        self.pseudo = [None if t is None else t.numpy().copy() for t in state["pseudo"]]
        self.confidence = [None if t is None else t.numpy().copy() for t in state["confidence"]]
        self.labelled_by = list(state["labelled_by"])
        self.history = [dict(h) for h in state["history"]]
        if state["method"] != self.config.method and self.history:  # a shared warm-up
            self.history[0].update(method=self.config.method, warmup_from=state["method"])
        self.round_index = int(state["round"])

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Atomically write :meth:`state_dict` (default ``out_dir/checkpoint.pt``) and rewrite
        ``metrics.jsonl`` from the history, so both always agree."""

        folder = Path(self.config.out_dir) if path is None else Path(path).parent
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        target = atomic_write_bytes(folder / CHECKPOINT_NAME if path is None else Path(path), buffer.getbuffer())
        lines = "".join(json.dumps(h) + "\n" for h in self.history)
        atomic_write_bytes(folder / METRICS_NAME, lines.encode())
        return target

    def resume(self, path: str | Path | None = None) -> bool:
        """Load ``path`` (default ``out_dir/checkpoint.pt``) if it exists. Returns whether it did."""
        if path is None:
            if self.config.out_dir is None:
                raise ValueError("resume needs config.out_dir or an explicit checkpoint path")
            path = Path(self.config.out_dir) / CHECKPOINT_NAME
        if not Path(path).is_file():
            return False
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log.info("resumed %s from %s at round %d", self.config.method, path, self.round_index)
        return True
