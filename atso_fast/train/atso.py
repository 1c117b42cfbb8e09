"""Asynchronous teacher-student optimisation (ATSO) and its baselines: one round engine over a
data store, in memory or on disk.

Map of this module (read top to bottom):

* **config**: :class:`ATSOConfig` (:mod:`atso_fast.train.config`, re-exported here) holds every
  setting; :func:`resolve_storage` says where the data live.
* **store**: ``ATSO(config)`` opens one :class:`~atso_fast.train.stores.DataStore`
  (:func:`make_store`): :class:`~atso_fast.train.stores.ArrayStore` (cases and pseudo labels in
  RAM, the live model relabels) or :class:`~atso_fast.train.disk_store.CacheStore` (a
  preprocessing cache, memory-mapped patches, each round exported and relabelled onto disk by the
  bulk archive engine). The engine reads and writes data only through it.
* **round engine**: :class:`ATSO` (``warmup``, ``round``, ``consolidate``, ``run``). Round ``k``
  (0: the warm-up; ``rounds + 1``: the consolidation) has three phases, ``train`` (start the
  student, fine-tune), ``export`` and ``relabel`` (new pseudo labels for the held-out part, then
  validation); a store with ``checkpoints_phases`` saves at each boundary, so a run resumes in
  the phase it was killed in. Who trains on and relabels what: :func:`plan_round`,
  :func:`split_balanced`; where students start: :meth:`ATSO._start_student`.
* **monitors**: label change, pseudo-label Dice (:mod:`atso_fast.train.monitor`, computed by the
  store as it relabels), the student's loss and agreement before it trains, the paper's premise
  (:func:`premise`), validation Dice and HD95 (:meth:`ATSO.evaluate`).
* **state**: :meth:`ATSO.state_dict` (the engine's part: model, theta0, M0, lineages, teacher,
  history; plus the store's part), checkpoints, ``metrics.jsonl``, callbacks.

Driving scenes (issue 24) run on the same engine: the Cityscapes data form of ``config.data``
(:mod:`atso_fast.train.scene_data`), ``model: {name: resnet_unet, ...}`` (:func:`build_model`),
the road-scene augmentation (:class:`~atso_fast.train.scene_augment.ScenePatches`) and IoU /
mIoU in :meth:`ATSO.evaluate` (``val_miou`` in every row), memory storage.

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
or ``"soft"`` the teacher's probabilities (cross-entropy + soft Dice against them; memory only).

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
relabelled (truth known only). The start agreement and the premise's trained side cost another
inference pass over the training part: on memory storage always; on disk with
``monitor_on_disk: true`` (NaN otherwise).

Every random choice of round k comes from generators seeded by ``(seed, k, purpose)``, and the
optimiser is created fresh each round, so a run resumed from the checkpoint of round k gives
exactly the tensors of an uninterrupted run (same device and thread count).

The relabel step is a callable ``relabel_fn(model, volumes) -> [(labels, confidence), ...]`` with
volumes ``(M, Z, Y, X)`` float32 *already normalised*, labels ``(Z, Y, X)`` uint8 and confidence
``(Z, Y, X)`` uint8 (max probability * 255); for soft targets each result also carries the
probabilities ``(C, Z, Y, X)``. The default (:func:`default_relabel_fn`) runs the engine's sliding
window with the training patch as the window, so an InstanceNorm network sees the same context
when it relabels as when it trained (a whole-slice pass normalises over other statistics). On
disk the round's exported package relabels U through the archive engine; ``relabel_fn`` serves
:meth:`ATSO.predict`.
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
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from atso_fast.engine.relabeler import Relabeler
from atso_fast.io import atomic_write_bytes, read_regular_file
from atso_fast.progress import Progress, duration
from atso_fast.train.augment import patch_augment
from atso_fast.train.config import INITS, METHODS, STORAGES, ATSOConfig, reports_iou, resolve_storage
from atso_fast.train.curves import CURVES_NAME, curves_png
from atso_fast.train.data import Sampler, SemiSupervisedData
from atso_fast.train.disk_store import ArchiveEngine, CacheStore, package_relabel_fn
from atso_fast.train.iou import IoUMeter
from atso_fast.train.mean_teacher import MeanTeacher, MeanTeacherConfig, mean_teacher_batches
from atso_fast.train.metrics import as_case_maps, case_metrics, case_summary, combine_case_metrics
from atso_fast.train.monitor import PooledDice, pooled_dice
from atso_fast.train.resnet_unet import ResNetUNet, load_encoder, resnet_unet_options
from atso_fast.train.stores import ArrayStore, DataStore, load_data, scene_sampler
from atso_fast.train.trainer import MixedBatches, OptimConfig, mean_loss
from atso_fast.train.unet import UNet

__all__ = [
    "METHODS",
    "INITS",
    "STORAGES",
    "ATSOConfig",
    "ATSO",
    "ArchiveATSO",
    "RelabelFn",
    "split_balanced",
    "subset_names",
    "plan_round",
    "build_model",
    "default_relabel_fn",
    "make_store",
    "load_data",
    "run_methods",
    "load_pretrained",
    "load_checkpoint_file",
    "model_name",
    "premise",
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "PHASES",
    "resolve_storage",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
PHASES = ("train", "export", "relabel", "done")
"""A round's phases as checkpoints record them (``done``: the run is finished)."""
_TRAIN, _MONITOR, _SPLIT = 1, 2, 3  # rng purposes

RelabelFn = Callable[[nn.Module, Sequence[np.ndarray]], list[tuple[np.ndarray, ...]]]
Callback = Callable[["ATSO", dict[str, Any]], None]


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
        raise ValueError(
            f"split_balanced needs parts >= 2 and >= parts non-negative sizes, got parts={parts}, sizes={list(sizes)}"
        )
    perm = np.random.default_rng([int(seed), _SPLIT]).permutation(len(sizes))
    order = sorted(perm.tolist(), key=lambda i: -int(sizes[i]))
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
        raise ValueError(
            f"plan_round needs k >= 1, method in {METHODS} and num_subsets >= 2, got k={k}, "
            f"method={method!r}, num_subsets={num_subsets}"
        )
    if method == "atso":
        names = subset_names(num_subsets)
        held = names[k % len(names)]
        return tuple(n for n in names if n != held), (held,)
    if method == "self-training":
        return ("U",), ("U",)
    if method in ("oracle", "mean-teacher"):
        return ("U",), ()
    return (), ()


def build_model(config: ATSOConfig) -> nn.Module:
    """The config's network, initialised from ``config.seed`` without touching torch's global RNG:
    a :class:`~atso_fast.train.unet.UNet` (``config.model`` holds its keyword arguments), or with
    ``model["name"] == "resnet_unet"`` a :class:`~atso_fast.train.resnet_unet.ResNetUNet` whose
    encoder is loaded from ``encoder_weights`` when given (``weights_only``; theta0 is then that
    encoder and a freshly initialised decoder).

    Raises:
        ValueError: a patch that is not a multiple of the network's divisor (the relabel window is
            the patch), or encoder weights that do not fit (naming the file).
    """
    spec = dict(config.model)
    if spec.get("name", "unet") == "resnet_unet":
        options = resnet_unet_options(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            net = ResNetUNet(
                config.num_classes,
                in_channels=config.in_channels,
                depth=options["depth"],
                decoder_channels=options["decoder_channels"],
            )
        if any(p % net.divisor for p in config.patch_size):
            raise ValueError(
                f"patch_size {config.patch_size} must be multiples of {net.divisor} for the ResNet "
                "U-Net (five stride-2 stages); the patch is also the relabel window"
            )
        if options["encoder_weights"] is not None:
            load_encoder(net.encoder, options["encoder_weights"])
        return net
    spec.pop("name", None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = UNet(config.in_channels, config.num_classes, spatial_dims=config.spatial_dims, **spec)
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
            model,
            window=config.patch_size,
            num_classes=config.num_classes,
            kind="logits",
            normalization=config.normalization if isinstance(config.normalization, dict) else None,
            in_channels=config.in_channels,
            device=config.device,
            **{
                "threshold": 0.0,
                "ignore_index": config.ignore_index,
                "save_probabilities": probabilities,
                **config.relabel,
            },
        )
        results = [engine.relabel_volume(v[0] if v.shape[0] == 1 else v, normalized=True) for v in volumes]
        if not probabilities:
            return [(r.labels, r.confidence) for r in results]
        out: list[tuple[np.ndarray, ...]] = []
        for r in results:
            if r.probabilities is None:  # config.relabel turned save_probabilities off
                raise ValueError(
                    "soft targets need the relabel engine's probabilities: drop save_probabilities from config.relabel"
                )
            out.append((r.labels, r.confidence, r.probabilities))
        return out

    return relabel


def make_store(
    config: ATSOConfig,
    *,
    data: SemiSupervisedData | None = None,
    relabeler: RelabelFn | None = None,
    archive_engine: ArchiveEngine | None = None,
) -> DataStore:
    """The store :func:`resolve_storage` picks for ``config`` (and ``data``): an
    :class:`~atso_fast.train.stores.ArrayStore` over ``data`` (default loaded from
    ``config.data``), or a :class:`~atso_fast.train.disk_store.CacheStore` over ``config.data``
    with ``archive_engine`` (which then refuses ``data`` and ``relabeler``).

    Raises:
        ValueError: see the stores.
    """
    if resolve_storage(config, data) == "disk":
        return CacheStore(config, archive_engine=archive_engine, data=data, relabeler=relabeler)
    return ArrayStore(config, data)


def load_checkpoint_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A trainer checkpoint read without blocking and loaded with ``weights_only=True``.

    Raises:
        ValueError: not a regular file, or truncated/corrupt (the message names the file).
    """
    data = read_regular_file(path)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (truncated zip), EOFError ...
        raise ValueError(
            f"{path}: not a readable atso-fast checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}); delete it to start "
            "afresh"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not an atso-fast checkpoint (holds {type(state).__name__})")
    return state


def run_methods(
    config: ATSOConfig | dict[str, Any],
    methods: Sequence[str] | Mapping[str, dict[str, Any]] = METHODS,
    *,
    data: SemiSupervisedData | None = None,
    relabeler: RelabelFn | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, ATSO]:
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
    warm_run = ATSO(
        replace(
            config,
            method="atso" if n >= 2 else "self-training" if n == 1 else "supervised",
            init="continue",
            num_subsets=2,
            targets="soft" if soft else "hard",
            out_dir=_subdir(config.out_dir, "warmup"),
        ),
        relabeler=relabeler,
        data=data,
        callbacks=callbacks,
    )
    warm_run.warmup()
    warm = warm_run.state_dict()
    runs = {}
    for name, overrides in plans.items():
        run = ATSO(
            replace(config, **{"out_dir": _subdir(config.out_dir, name), **overrides}),
            relabeler=relabeler,
            data=data,
            callbacks=callbacks,
        )
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
            raise ValueError(
                f"run {name!r}: method must be one of {METHODS} and overrides ATSOConfig "
                f"fields, got method {method!r}, unknown fields {sorted(unknown)}"
            )
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
    return {
        "trained_label_dice": trained.get("label_dice", math.nan),
        "trained_model_dice": trained.get("model_dice", math.nan),
        "trained_gain": trained.get("model_dice", math.nan) - trained.get("label_dice", math.nan),
        "trained_agreement": trained.get("agreement", math.nan),
        "held_gain": held_gain,
    }


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


def _all_present(arrays: Sequence[np.ndarray | None]) -> list[np.ndarray] | None:
    """``arrays`` as a list when none is missing, else None."""
    present = [a for a in arrays if a is not None]
    return present if len(present) == len(arrays) else None


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class ATSO:
    """ATSO / self-training / supervised / oracle / Mean Teacher, round by round, with checkpoints,
    over the data store the config asks for (:func:`make_store`): every method works with both.

    Args:
        config: :class:`ATSOConfig` or a dict of its fields.
        model: any ``nn.Module`` mapping ``(B, M, *patch)`` to logits ``(B, C, *patch)``; default a
            :class:`~atso_fast.train.unet.UNet` from ``config.model``.
        relabeler: ``relabel_fn(model, volumes)`` (see module docstring); default
            :func:`default_relabel_fn` (with probabilities for soft targets). Memory storage
            only: on disk each round's exported package relabels (``predict`` uses the default).
        data: :class:`~atso_fast.train.data.SemiSupervisedData` (memory storage); default loaded
            from ``config.data``.
        callbacks: ``fn(atso, metrics)`` called after the warm-up and after every round (on disk
            ``metrics`` also holds ``package_path`` and ``pseudo_path``, absolute).
        archive_engine: disk storage: the bulk relabel engine of each round
            (:func:`atso_fast.train.disk_store.local_engine` by default; the CLI's
            ``--engine ray`` passes the Ray engine).

    Attributes:
        store: the :class:`~atso_fast.train.stores.DataStore` (``ArrayStore`` or ``CacheStore``).
        config: the config with what the store resolved (normalisation, spacing, ...).
        subsets: the parts of U by name (``U1`` .. or ``U``), lists of unlabelled case indices.
        round_index: the last finished round (-1 before the warm-up).
        history: one metrics dict per finished round.

    Raises:
        ValueError: bad config, no data, too few unlabelled cases for the method, an oracle
            without the unlabelled cases' true labels, a memory-only feature on disk storage.
    """

    def __init__(
        self,
        config: ATSOConfig | dict[str, Any],
        model: nn.Module | None = None,
        relabeler: RelabelFn | None = None,
        *,
        data: SemiSupervisedData | None = None,
        callbacks: Sequence[Callback] = (),
        archive_engine: ArchiveEngine | None = None,
    ) -> None:
        self.store = make_store(
            ATSOConfig.coerce(config), data=data, relabeler=relabeler, archive_engine=archive_engine
        )
        self.config = self.store.config
        self.model = model if model is not None else build_model(self.config)
        if self.config.pretrained is not None:
            load_pretrained(self.model, self.config.pretrained)
        self.init_state = _state_copy(self.model)  # theta0: where reinit students start
        self.soft = self.config.targets == "soft"
        self.relabel_fn = (
            relabeler if relabeler is not None else default_relabel_fn(self.config, probabilities=self.soft)
        )
        self.callbacks = list(callbacks)
        self.subsets = self._make_subsets()
        self.round_index, self.phase = -1, "train"
        self.labelled_by: list[str | None] = [None] * len(self.store.unlabelled_sizes)
        self.history: list[dict[str, Any]] = []
        self.base_state: dict[str, torch.Tensor] | None = None
        self.lineages: dict[str, dict[str, Any]] = {}  # held-out part -> {"model": "Mk", "state": ...}
        self.teacher_state: dict[str, Any] | None = None  # mean-teacher: the EMA teacher between rounds
        self.pending: dict[str, Any] = {}  # metrics of the round in progress
        self.train_state: dict[str, Any] | None = None  # mid-round optimiser state (phase checkpoints)
        self._fresh: dict[int, tuple[np.ndarray, ...]] = {}  # predictions of the current model, by case
        self._resumed_phase: str | None = None
        self._round_start = 0.0

    def _make_subsets(self) -> dict[str, list[int]]:
        cfg, names = self.config, self.store.unlabelled_names
        n = len(names)
        if cfg.method == "supervised":
            return {}
        if cfg.method == "oracle":
            missing = [name for name, truth in zip(names, self.store.truths(range(n))) if truth is None]
            if n < 1 or missing:
                raise ValueError(
                    f"method 'oracle' needs the true labels of every unlabelled case (>= 1); got {n} "
                    f"cases, {len(missing)} without a label: {missing[:5]}"
                )
            return {"U": list(range(n))}
        if cfg.method in ("self-training", "mean-teacher"):
            if n < 1:
                raise ValueError(f"method {cfg.method!r} needs at least 1 unlabelled case, got 0")
            return {"U": list(range(n))}
        if n < cfg.num_subsets:
            raise ValueError(
                f"method 'atso' needs at least {cfg.num_subsets} unlabelled cases to split into "
                f"{cfg.num_subsets} parts, got {n}"
            )
        parts = split_balanced(self.store.unlabelled_sizes, cfg.seed, cfg.num_subsets)
        return dict(zip(subset_names(cfg.num_subsets), parts))

    def add_callback(self, fn: Callback) -> None:
        """Call ``fn(atso, metrics)`` after the warm-up and after every round."""
        self.callbacks.append(fn)

    # ------------------------------------------------------------------ stages
    def warmup(self) -> dict[str, Any]:
        """Supervised training on L (M0), then pseudo-labels for every subset. Returns metrics."""
        if self.round_index >= 0:
            raise RuntimeError("warm-up already done (round_index >= 0)")
        return self._run_round(0)

    def round(self) -> dict[str, Any]:
        """Run the next round (start the student, fine-tune, relabel per :func:`plan_round`)."""
        cfg = self.config
        if self.round_index < 0:
            raise RuntimeError("call warmup() before round()")
        if self.round_index >= cfg.rounds:
            raise RuntimeError(f"all {cfg.rounds} rounds are done")
        return self._run_round(self.round_index + 1)

    def consolidate(self) -> dict[str, Any]:
        """The final student: trained on L + every part of U with the final labels (started as
        ``init`` says), relabelling nothing. It is the model the run is evaluated with."""
        cfg = self.config
        if self.round_index != cfg.rounds:
            raise RuntimeError(f"consolidate() follows the last round ({cfg.rounds}); the run is at {self.round_index}")
        return self._run_round(cfg.rounds + 1)

    @property
    def finished(self) -> bool:
        """Warm-up, every round and (with ``consolidate``) the consolidation step are done."""
        return self.round_index >= self.config.rounds + int(self.config.consolidate)

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

    def schedule(self, k: int) -> tuple[int, float]:
        """``(steps, peak learning rate)`` of round ``k`` (0: the warm-up; ``rounds + 1``: the
        consolidation). A ``reinit`` student starts from theta0, so it gets the warm-up's full
        schedule; other students fine-tune for ``steps_per_round`` at ``round_lr`` (decayed)."""
        cfg = self.config
        if k == 0 or cfg.init == "reinit":
            return cfg.warmup_steps, cfg.lr
        return cfg.steps_per_round, cfg.round_lr * cfg.round_lr_decay ** (min(k, cfg.rounds) - 1)

    # ------------------------------------------------------------------ the round engine
    def _plan(self, k: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(parts trained on, parts relabelled)`` of round ``k``."""
        if k == 0:
            return (), tuple(self.subsets)
        if k > self.config.rounds:  # consolidation
            return tuple(self.subsets), ()
        return plan_round(self.config.method, k, self.config.num_subsets)

    def _run_round(self, k: int) -> dict[str, Any]:
        """The phases of round ``k`` from the one it is in (a resumed run re-enters it)."""
        self._round_start = time.perf_counter()
        train_on, relabel = self._plan(k)
        if self.phase == "train":
            self._timed("train_s", self._train_phase, k, train_on, relabel)
            self._enter("export")
        if self.phase == "export":
            self._timed("export_s", self.store.export, self.model, k)
            self._enter("relabel")
        self._timed("relabel_s", self._relabel_phase, k, train_on, relabel)
        return self._finish(k)

    def _enter(self, phase: str) -> None:
        self.phase = phase
        if self.store.checkpoints_phases:
            self.save_checkpoint()

    def _timed(self, key: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn``; stores with phase checkpoints add its seconds to the row's ``timing``."""
        start = time.perf_counter()
        fn(*args)
        if self.store.checkpoints_phases:
            timing = self.pending.setdefault("timing", {})
            timing[key] = timing.get(key, 0.0) + time.perf_counter() - start

    def _train_phase(self, k: int, train_on: tuple[str, ...], relabel: tuple[str, ...]) -> None:
        """Start the student (unless resuming mid-phase), measure it, fine-tune it."""
        cfg = self.config
        if self.train_state is None:  # a fresh start of the phase (not a mid-round resume)
            self.pending = {
                "round": k,
                "stage": "warm-up" if k == 0 else "consolidate" if k > cfg.rounds else "round",
                "method": cfg.method,
                "model": model_name(k, cfg.rounds),
                "student_from": None,
                "trained_on": ["L", *train_on],
                "train_labels_from": self._labels_from(train_on),
                "train": {},
                "student": {},
            }
            if k > 0:
                self.pending["student_from"] = self._start_student(k, relabel)
        idx = sorted(i for name in train_on for i in self.subsets[name])
        pseudo = self._pseudo_sampler(idx)
        if k > 0 and self.train_state is None:
            self.pending["student"] = self._student_monitor(idx, pseudo, k)
        steps, lr = self.schedule(k)
        teacher = self._teacher(idx)
        batches = self._batches(pseudo, k) if teacher is None else self._teacher_batches(idx)
        stats = self.store.fit(
            self.model,
            batches,
            key=(cfg.seed, k, _TRAIN),
            steps=steps,
            lr=lr,
            on_step=self._progress(k, steps),
            consistency=teacher,
            resume=self.train_state,
            checkpoint=self._checkpoint_mid_round,
            **self._train_kwargs(),
        )
        self.train_state = None
        if teacher is not None:
            self.teacher_state = teacher.state_dict()
        if k == 0:
            self.base_state = _state_copy(self.model)
        if cfg.init == "lineage" and k > 0 and relabel:
            self.lineages[relabel[0]] = {"model": model_name(k, cfg.rounds), "state": _state_copy(self.model)}
        self.pending["train"] = stats
        if k > 0:
            self.pending["student"].update(
                {key: stats[key] for key in ("pseudo_loss", "pseudo_first_loss", "pseudo_last_loss")}
            )

    def _relabel_phase(self, k: int, train_on: tuple[str, ...], relabel: tuple[str, ...]) -> None:
        """The premise's trained side (memory), then the store relabels the held-out parts."""
        cfg, metrics = self.config, self.pending
        idx = sorted(i for name in train_on for i in self.subsets[name])
        trained = self._premise_trained(idx, k) if relabel else {}
        model_id = model_name(k, cfg.rounds)
        fresh, self._fresh = self._fresh, {}
        monitor, row = self.store.relabel(
            {name: self.subsets[name] for name in relabel},
            k,
            predict=self.predict,
            known=fresh,
            resume=self._resumed_phase == "relabel",
        )
        for name in relabel:
            for i in self.subsets[name]:
                self.labelled_by[i] = model_id
        timing = row.pop("timing", {})
        metrics.update(
            {
                "relabelled": list(relabel),
                "relabelled_by": model_id if relabel else None,
                "monitor": monitor,
                "relabel": row.pop("relabel"),
                "pseudo_dice_all": self._pseudo_dice_all(),
                **row,
            }
        )
        if timing:
            metrics.setdefault("timing", {}).update(timing)
        for name in train_on:
            monitor.setdefault(name, {})["pre_loss"] = metrics["student"]["pre_loss"]
        if k > 0:
            metrics["premise"] = premise(trained, [monitor[n] for n in relabel])

    def _finish(self, k: int) -> dict[str, Any]:
        """Validate, record the round, checkpoint, call back."""
        metrics, start = self.pending, time.perf_counter()
        metrics.update(self.validate(self.store.validation_package(k)))
        if self.store.checkpoints_phases:  # the phases may have run in several processes
            metrics["timing"]["validate_s"] = time.perf_counter() - start
            metrics["seconds"] = sum(
                metrics["timing"].get(key, 0.0) for key in ("train_s", "export_s", "relabel_s", "validate_s")
            )
        else:
            metrics["seconds"] = time.perf_counter() - self._round_start
        metrics = _nan_to_none(metrics)
        self.history.append(metrics)
        self.round_index, self.phase, self.pending, self._resumed_phase = k, "train", {}, None
        timing = metrics.get("timing") or {}
        phases = ", ".join(
            f"{key[:-2]} {timing[key]:.1f}" for key in ("train_s", "export_s", "relabel_s") if key in timing
        )
        log.info(
            "%s round %d: train loss %s, val mean Dice %s, %.1f s%s",
            self.config.method,
            k,
            metrics["train"]["loss"],
            metrics["val_mean_dice"],
            metrics["seconds"],
            f" ({phases})" if phases else "",
        )
        self._say_round(metrics)
        if self.config.out_dir is not None:
            self.save_checkpoint()
        extra = self.store.callback_fields(metrics)
        for fn in self.callbacks:
            fn(self, {**metrics, **extra} if extra else metrics)
        return metrics

    def _checkpoint_mid_round(self, train_state: dict[str, Any]) -> None:
        self.train_state = train_state
        self.save_checkpoint()
        self.train_state = None

    # ------------------------------------------------------------------ round helpers
    def _start_student(self, k: int, relabel: tuple[str, ...]) -> str:
        """Load the weights this round's student starts from; returns the model's name."""
        init = self.config.init
        if init == "reinit":
            self.model.load_state_dict(self.init_state)
            return "theta0"
        if init == "m0":
            self.model.load_state_dict(self._m0_state())
            return "M0"
        if init == "lineage" and relabel:
            line = self.lineages.get(relabel[0])
            self.model.load_state_dict(self._m0_state() if line is None else line["state"])
            return "M0" if line is None else line["model"]
        return model_name(k - 1, self.config.rounds)  # continue (lineage: consolidation continues the last model)

    def _m0_state(self) -> dict[str, torch.Tensor]:
        """M0's weights (kept by the warm-up)."""
        if self.base_state is None:
            raise ValueError("M0's weights are not there: the warm-up (round 0) has not finished")
        return self.base_state

    def _labels_from(self, train_on: Sequence[str]) -> dict[str, list[str]]:
        if self.config.method in ("oracle", "mean-teacher"):
            source = "truth" if self.config.method == "oracle" else "teacher"
            return {name: [source] for name in train_on}
        out = {}
        for name in train_on:
            models = set()
            for i in self.subsets[name]:
                model = self.labelled_by[i]
                if model is None:
                    raise ValueError(f"unlabelled case {i} of part {name} has no pseudo label to train on")
                models.add(model)
            out[name] = sorted(models)
        return out

    def _train_kwargs(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "optim": OptimConfig.from_value(cfg.optim),
            "ignore_index": cfg.ignore_index,
            "device": cfg.device,
            "amp": cfg.amp,
            "channels_last": cfg.channels_last,
        }

    def _progress(self, k: int, steps: int) -> Callable[[int, Any], None] | None:
        """Progress lines of round ``k``'s training (none without steps)."""
        cfg = self.config
        if steps <= 0:
            return None
        phase = (
            "warm-up on L"
            if k == 0
            else "consolidate: fine-tune"
            if k > cfg.rounds
            else f"round {k}/{cfg.rounds}: fine-tune"
        )
        progress = Progress(f"{cfg.method} {phase}", steps, enabled=cfg.progress)
        return lambda done, run: progress.update(done)

    def _batches(self, pseudo: Sampler | None, k: int) -> MixedBatches:
        """Warm-up (k = 0): whole labelled batches; rounds: per method and config."""
        cfg = self.config
        matched = cfg.method == "supervised" and cfg.supervised_batch == "matched" and k > 0
        soft = cfg.num_classes if self.soft and pseudo is not None and cfg.method != "oracle" else None
        return MixedBatches(
            self.store.labelled_sampler(),
            pseudo,
            cfg.batch_size,
            labelled_ratio=cfg.labelled_ratio,
            augment=patch_augment(cfg.augment),
            labelled_only=matched,
            soft_channels=soft,
        )

    def _pseudo_sampler(self, idx: list[int]) -> Sampler | None:
        """Sampler over the targets of ``idx``: the truth (oracle), else the pseudo labels with
        low-confidence voxels -> ignore_index; None without cases or targets (Mean Teacher)."""
        if not idx or self.config.method == "mean-teacher":
            return None  # Mean Teacher: no targets on U, the teacher's consistency term (_teacher_batches)
        return self.store.target_sampler(idx, truth=self.config.method == "oracle")

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
        """Labelled samples first, then patches of the unlabelled images ``idx`` (labels all ignored;
        road scenes: augmented frames, :func:`~atso_fast.train.stores.scene_sampler`)."""
        cfg = self.config
        images = self.store.images(idx)
        pool = scene_sampler(cfg, images, [np.broadcast_to(np.uint8(cfg.ignore_index), im.shape[1:]) for im in images])
        return mean_teacher_batches(
            self.store.labelled_sampler(),
            images,
            cfg.batch_size,
            labelled_ratio=cfg.labelled_ratio,
            augment=patch_augment(cfg.augment),
            pool=pool,
        )

    # ------------------------------------------------------------------ monitors
    def _student_monitor(self, idx: list[int], pseudo: Sampler | None, k: int) -> dict[str, float]:
        """Before training: the student's loss on sampled target patches, and (memory storage)
        its hard Dice agreement with its targets over the whole training part (1.0: nothing left
        to learn)."""
        if pseudo is None:
            return {"pre_loss": math.nan, "start_agreement": math.nan}
        cfg, agreement = self.config, math.nan
        if isinstance(self.store, CacheStore):
            if cfg.monitor_on_disk:
                agreement = self.store.start_agreement(self.model, idx, k)
        else:
            preds = [r[0] for r in self.predict(self.store.images(idx))]
            _, agreement = pooled_dice(preds, pseudo.labels, cfg.num_classes, ignore_index=cfg.ignore_index)
        return {"pre_loss": self._pre_loss(pseudo, k), "start_agreement": agreement}

    def _pre_loss(self, pseudo: Sampler, k: int) -> float:
        """Loss of the student entering round k on (hard) target patches it is about to learn."""
        cfg = self.config
        if cfg.monitor_patches == 0:
            return math.nan
        rng = _rng(cfg.seed, k, _MONITOR)
        pairs = [pseudo.sample(rng) for _ in range(cfg.monitor_patches)]
        pairs = [(image[: cfg.in_channels], label) for image, label in pairs]
        return mean_loss(self.model, pairs, ignore_index=cfg.ignore_index, device=cfg.device)

    def _premise_trained(self, idx: list[int], k: int) -> dict[str, float]:
        """After fine-tuning, where the truth of the training part is known: the Dice of the
        labels the student trained on, of its own predictions there, and their agreement. In
        memory the predictions are kept for a relabelling of the same cases by the same model
        (self-training); on disk (``monitor_on_disk``) the store runs round ``k``'s package."""
        cfg = self.config
        if not idx or cfg.method not in ("atso", "self-training"):
            return {}
        if isinstance(self.store, CacheStore):
            if not cfg.monitor_on_disk:
                return {}
            return self.store.trained_side(idx, k, resume=self._resumed_phase == "relabel")
        truth = _all_present(self.store.truths(idx))
        if truth is None:
            return {}
        results = self.predict(self.store.images(idx))
        self._fresh = dict(zip(idx, results))
        preds, labels = [r[0] for r in results], _all_present(self.store.labels(idx))
        if labels is None:
            raise ValueError("the student's training cases have no pseudo labels")
        c, ignore = cfg.num_classes, cfg.ignore_index
        return {
            "label_dice": pooled_dice(labels, truth, c, ignore_index=ignore)[1],
            "model_dice": pooled_dice(preds, truth, c, ignore_index=ignore)[1],
            "agreement": pooled_dice(preds, labels, c, ignore_index=ignore)[1],
        }

    def _pseudo_dice_all(self) -> float:
        """Pooled Dice of the current pseudo labels of every case with truth (relabelling methods)."""
        if self.config.method not in ("atso", "self-training"):
            return math.nan
        return self.store.pseudo_dice()

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
        miou = metrics.get("val_miou")
        print(
            f"atso-fast: {self.config.method} {stage}"
            f" done in {duration(metrics['seconds'])}: train loss {'-' if loss is None else f'{loss:.4f}'}, "
            f"val mean Dice {'-' if dice is None else f'{dice:.4f}'}"
            + ("" if "val_miou" not in metrics else f", val mIoU {'-' if miou is None else f'{miou:.4f}'}")
            + f"; {left} stage(s) left, ETA {duration(eta)}",
            file=sys.stderr,
            flush=True,
        )

    # ------------------------------------------------------------------ prediction and evaluation
    def predict(self, volumes: Sequence[np.ndarray]) -> list[tuple[np.ndarray, ...]]:
        """Run ``relabel_fn`` on normalised ``(M, Z, Y, X)`` volumes with the model in eval mode.

        Returns:
            ``(labels uint8, confidence uint8)`` per volume, plus ``probabilities (C, Z, Y, X)``
            float16 when the run uses soft targets.

        Raises:
            ValueError: the relabel function returned the wrong count, shapes, or no probabilities
                for soft targets.
        """
        return self._predict_with(self.relabel_fn, volumes)

    def _predict_with(self, relabel_fn: RelabelFn, volumes: Sequence[np.ndarray]) -> list[tuple[np.ndarray, ...]]:
        was_training = self.model.training
        self.model.eval()
        try:
            out = relabel_fn(self.model, list(volumes))
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
            if self.soft and relabel_fn is self.relabel_fn:
                if len(res) < 3 or res[2] is None or tuple(res[2].shape) != (self.config.num_classes, *vol.shape[1:]):
                    raise ValueError(
                        "targets='soft' needs a relabel_fn returning (labels, confidence, probabilities "
                        f"(C={self.config.num_classes}, *spatial)) for a volume {vol.shape}"
                    )
                item += (np.asarray(res[2], np.float16),)
            results.append(item)
        return results

    def evaluate(self, cases: Sequence[Any], package: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Dice of the current model on labelled ``cases``: pooled per class over them, and per
        case (Dice and HD95 mean +- SD per class, :func:`~atso_fast.train.metrics.case_metrics`);
        with :func:`~atso_fast.train.config.reports_iou` also IoU (:mod:`atso_fast.train.iou`),
        and no HD95.

        Args:
            cases: objects with ``image`` ``(M, Z, Y, X)`` (normalised, on the model's grid) and
                ``label`` ``(Z, Y, X)``, arrays or ``.npy`` paths
                (:class:`~atso_fast.train.data.Case`, :class:`~atso_fast.train.cache.CachedCase`);
                read as many at a time as the store holds in memory.
            package: run this exported package (for volumes on its grid, e.g. a disk round's
                ``grid_package``; ``auto`` runtime) instead of the live model.

        Returns:
            ``{"dice": [C floats], "mean_dice": mean over foreground classes, "cases": per-case
            metrics}`` (NaN and no ``cases`` without cases); with IoU also ``"iou"`` ([C], pooled
            over the cases: NaN for a class absent from truth and prediction), ``"miou"`` (its
            mean over the defined classes, background included: the Cityscapes number) and
            ``"miou_per_image"`` (each case's mIoU, averaged).
        """
        iou = reports_iou(self.config)
        if not cases:
            return {
                "dice": [],
                "mean_dice": math.nan,
                **({"iou": [], "miou": math.nan, "miou_per_image": math.nan} if iou else {}),
            }
        cfg = self.config
        relabel_fn = self.relabel_fn if package is None else package_relabel_fn(package, cfg)
        dice, parts = PooledDice(cfg.num_classes, ignore_index=cfg.ignore_index), []
        meter = IoUMeter(cfg.num_classes, cfg.ignore_index) if iou else None
        for images, truths in self.store.case_batches(cases):
            preds = [r[0] for r in self._predict_with(relabel_fn, images)]
            for pred, truth in zip(preds, truths):
                dice.add(pred, truth)
                (pred_map, spacing), (truth_map, _) = as_case_maps(pred, cfg.spacing), as_case_maps(truth, cfg.spacing)
                parts.append(
                    case_metrics(
                        [pred_map],
                        [truth_map],
                        cfg.num_classes,
                        spacing=spacing,
                        ignore_index=cfg.ignore_index,
                        hd95=not iou,
                    )
                )
                if meter is not None:
                    meter.update(pred_map, truth_map)
        per_class, mean_fg = dice.result()
        out = {"dice": per_class, "mean_dice": mean_fg, "cases": combine_case_metrics(parts, cfg.num_classes)}
        if meter is not None:
            result = meter.result()
            out.update(
                iou=result["pooled"]["iou"], miou=result["pooled"]["miou"], miou_per_image=result["per_image"]["miou"]
            )
        return out

    def validate(self, package: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """The current model (or ``package``, see :meth:`evaluate`) on the validation cases:
        pooled Dice per class and its foreground mean, and the per-case summary (Dice and HD95
        mean +- SD per class); with IoU also ``val_iou``, ``val_miou`` (pooled) and
        ``val_miou_per_image``."""
        result = self.evaluate(self.store.val_cases, package)
        out = {"val_dice": result["dice"], "val_mean_dice": result["mean_dice"]}
        if "miou" in result:
            out.update(val_iou=result["iou"], val_miou=result["miou"], val_miou_per_image=result["miou_per_image"])
        if "cases" in result:
            out["val_cases"] = case_summary(result["cases"])
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: the engine's part (model, theta0, M0, lineages, Mean
        Teacher's teacher, history; with phase checkpoints also the phase, the round in progress
        and the mid-round optimiser state) and the store's (memory: the pseudo labels; disk: where
        they live). Tensors and plain containers only (``weights_only`` safe)."""
        state = {
            "round": self.round_index,
            "method": self.config.method,
            "config": self.config.to_dict(),
            "subsets": {k: list(v) for k, v in self.subsets.items()},
            "model": _state_copy(self.model),
            "base_model": self.base_state,
            "init_model": self.init_state,
            "labelled_by": list(self.labelled_by),
            "lineages": {k: dict(v) for k, v in self.lineages.items()},
            "teacher": self.teacher_state,
            "history": json.loads(json.dumps(self.history)),
        }
        if self.store.checkpoints_phases:
            state.update(
                phase="done" if self.finished else self.phase,
                train_state=self.train_state,
                pending=json.loads(json.dumps(_nan_to_none(self.pending))),
            )
        return {**self.store.state_dict(), **state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. On memory storage a warm-up state (round 0) may seed any
        method that needs no more pseudo labels (or probabilities) than it holds; later states,
        and every state on disk storage, need the same method.

        Raises:
            ValueError: wrong format, method, split, cases, normalisation or preprocessing, or
                missing pseudo labels or probabilities.
        """
        self._check_state(state)
        self.model.load_state_dict(state["model"])
        self.base_state, self.init_state = state["base_model"], state["init_model"]
        self._fresh = {}
        self.store.load_state_dict(state)
        self.labelled_by = list(state["labelled_by"])
        self.lineages = {k: dict(v) for k, v in state["lineages"].items()}
        self.teacher_state = state.get("teacher")
        self.history = [dict(h) for h in state["history"]]
        if state["method"] != self.config.method and self.history:  # a shared warm-up
            self.history[0].update(method=self.config.method, warmup_from=state["method"])
        self.round_index = int(state["round"])
        phase = state.get("phase", "train")
        self.phase = "train" if phase == "done" else phase
        self.pending = dict(state.get("pending") or {})
        self.train_state = state.get("train_state")
        self._resumed_phase = self.phase

    def _check_state(self, state: dict[str, Any]) -> None:
        cfg = self.config
        needed = (
            [i for idx in self.subsets.values() for i in idx] if cfg.method not in ("oracle", "mean-teacher") else []
        )
        self.store.check_state(state, subsets=self.subsets, needed=needed)
        if state["round"] > 0 and (state["method"], state["config"]["init"]) != (cfg.method, cfg.init):
            raise ValueError(
                f"state of method {state['method']!r} (init {state['config']['init']!r}) at round "
                f"{state['round']} cannot resume method {cfg.method!r} (init {cfg.init!r})"
            )
        if state["round"] > 0 and state["subsets"] != self.subsets:
            raise ValueError("state split differs from this run's split (different seed or data)")
        if state.get("phase", "train") not in PHASES:
            raise ValueError(f"checkpoint phase must be one of {PHASES}, got {state['phase']!r}")

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Atomically write :meth:`state_dict` (default ``out_dir/checkpoint.pt``) and rewrite
        ``metrics.jsonl`` and its curves ``metrics.png`` from the history, so they always agree."""

        if path is None:
            if self.config.out_dir is None:
                raise ValueError("save_checkpoint needs config.out_dir or an explicit checkpoint path")
            path = Path(self.config.out_dir) / CHECKPOINT_NAME
        folder = Path(path).parent
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        target = atomic_write_bytes(Path(path), buffer.getbuffer())
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


ArchiveATSO = ATSO
"""The name of the disk-storage trainer before the stores (an alias: ``ATSO`` picks the store)."""
