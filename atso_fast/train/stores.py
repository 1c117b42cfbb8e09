"""Where an ATSO run keeps its cases and pseudo labels: the data-store interface the round engine
(:class:`atso_fast.train.atso.ATSO`) drives, and the in-memory store.

A store answers four questions for the round engine, and nothing else:

* **what to train on**: :meth:`DataStore.labelled_sampler`, :meth:`DataStore.target_sampler`
  (patch samplers over L, and over the targets of some cases of U), and :meth:`DataStore.fit`
  (how batches reach the training loop: one generator in this process, or a ``DataLoader``);
* **how to relabel**: :meth:`DataStore.export` (what a round leaves behind) and
  :meth:`DataStore.relabel` (new pseudo labels for parts of U, with their monitors,
  :class:`~atso_fast.train.monitor.PseudoLabelStats`);
* **what to read back**: the unlabelled cases' images, truths and current labels
  (:meth:`DataStore.images`, :meth:`DataStore.truths`, :meth:`DataStore.labels`), the
  validation cases and :meth:`DataStore.case_batches` (as many cases at once as the store holds
  in memory), :meth:`DataStore.pseudo_dice`;
* **what to save**: :meth:`DataStore.state_dict` and friends (the store's part of a checkpoint).

Two stores implement it:

* :class:`ArrayStore` (here): every case and pseudo label in RAM as NumPy arrays; the live model
  relabels through the engine's sliding window (``predict``); soft targets and Mean Teacher work.
  Driving scenes (the Cityscapes data form, :mod:`atso_fast.train.scene_data`) live here: frames
  are small, and the road-scene augmentation samples whole frames (:func:`scene_sampler`).
* :class:`~atso_fast.train.disk_store.CacheStore`: a preprocessing cache of ``.npy`` files,
  memory-mapped patches through a ``DataLoader``, each round exported as a model package that
  relabels onto disk through the bulk archive engine, phase checkpoints.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from atso_fast.train.config import ATSOConfig
from atso_fast.train.data import (
    PatchSampler,
    Sampler,
    SemiSupervisedData,
    case_labels,
    dataset_class_names,
    load_raw,
    low_confidence,
    open_array,
    prepare_data,
    resolve_normalization,
)
from atso_fast.train.monitor import PooledDice, PseudoLabelStats
from atso_fast.train.scene_augment import SceneAugmentConfig, ScenePatches
from atso_fast.train.scene_data import is_scene_spec, load_scene_raw, scene_class_names
from atso_fast.train.trainer import ConsistencyTerm, MixedBatches, train_steps

__all__ = ["DataStore", "ArrayStore", "Predict", "load_data", "read_case_array", "scene_sampler"]

Predict = Callable[[Sequence[np.ndarray]], list[tuple[np.ndarray, ...]]]
"""``predict(volumes)``: the current model on normalised ``(M, Z, Y, X)`` volumes ->
``(labels, confidence[, probabilities])`` per volume (:meth:`atso_fast.train.atso.ATSO.predict`)."""


class DataStore(Protocol):
    """What the round engine reads from and writes to a store (see the module docstring).

    Attributes:
        config: the run's config with what the store resolved (normalisation policy, spacing,
            preprocessing spec, class names); the engine adopts it.
        in_memory: cases live in RAM, so monitors that cost another inference pass over a
            training part run (start agreement, the premise's trained side), and soft targets
            and Mean Teacher are possible.
        checkpoints_phases: the round engine checkpoints at every phase boundary (train ->
            export -> relabel) and every ``checkpoint_every`` steps, resumes mid-round, and
            reports each phase's seconds (``timing``).
        format_version: the checkpoint format of this store.
        unlabelled_names, unlabelled_sizes: name and voxel count of each unlabelled case.
        val_cases: the validation cases (``.image``, ``.label``: arrays or ``.npy`` paths).
    """

    config: ATSOConfig
    in_memory: bool
    checkpoints_phases: bool
    unlabelled_names: list[str]
    unlabelled_sizes: list[int]

    # read-only here, so that a store may narrow the type (an int or a str; a list of its own cases)
    @property
    def format_version(self) -> int | str: ...

    @property
    def val_cases(self) -> Sequence[Any]: ...

    def images(self, idx: Sequence[int]) -> list[np.ndarray]:
        """Normalised ``(M, Z, Y, X)`` images of unlabelled cases ``idx`` (memory maps on disk)."""

    def truths(self, idx: Sequence[int]) -> list[np.ndarray | None]:
        """The hidden truth of unlabelled cases ``idx`` (monitoring and the oracle only)."""

    def labels(self, idx: Sequence[int]) -> list[np.ndarray | None]:
        """The current pseudo labels of unlabelled cases ``idx`` (None before the first)."""

    def labelled_sampler(self) -> Sampler:
        """Patches of L with their labels."""

    def target_sampler(self, idx: Sequence[int], *, truth: bool = False) -> Sampler:
        """Patches of unlabelled cases ``idx`` with their targets: the truth (``truth=True``), else
        the current pseudo labels, voxels below the confidence threshold set to ``ignore_index``."""

    def fit(
        self,
        model: nn.Module,
        batches: MixedBatches,
        *,
        key: tuple[int, int, int],
        steps: int,
        lr: float,
        on_step: Callable[[int, Any], None] | None = None,
        consistency: ConsistencyTerm | None = None,
        resume: dict[str, Any] | None = None,
        checkpoint: Callable[[dict[str, Any]], None] | None = None,
        **train_kwargs: Any,
    ) -> dict[str, float]:
        """Train ``model`` for ``steps`` steps on ``batches`` drawn from generators seeded by
        ``key`` = ``(seed, round, purpose)``; returns the loop's statistics
        (:func:`~atso_fast.train.trainer.train_steps`). ``resume`` and ``checkpoint(state)``:
        mid-round optimiser state (stores with ``checkpoints_phases``)."""

    def export(self, model: nn.Module, k: int) -> None:
        """After round ``k``'s training: whatever the store keeps of the model (disk: packages)."""

    def relabel(
        self,
        parts: Mapping[str, Sequence[int]],
        k: int,
        *,
        predict: Predict,
        known: dict[int, tuple[np.ndarray, ...]],
        resume: bool = False,
    ) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
        """Relabel the cases of each part with round ``k``'s model and make the new labels
        current. ``known``: predictions of this model already made, by case.

        Returns:
            ``(monitor, row)``: :class:`~atso_fast.train.monitor.PseudoLabelStats` per part, and
            the entries the round's metrics row gains (``"relabel"``: what was relabelled;
            ``"timing"`` entries join the row's timing).
        """

    def pseudo_dice(self) -> float:
        """Pooled Dice of the current pseudo labels of every unlabelled case with known truth."""

    def validation_package(self, k: int) -> str | os.PathLike[str] | None:
        """The package round ``k`` is validated with (None: the live model)."""

    def callback_fields(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Extra entries of the metrics a callback receives."""

    def case_batches(self, cases: Sequence[Any]) -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
        """``(images, labels)`` of labelled ``cases``, as many at once as the store holds in memory."""

    def state_dict(self) -> dict[str, Any]:
        """The store's part of a checkpoint (with ``format_version``)."""

    def check_state(self, state: dict[str, Any], *, subsets: dict[str, list[int]], needed: Sequence[int]) -> None:
        """Raise ValueError when ``state`` is not one this store can load (format, data, the
        pseudo labels of ``needed`` cases)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the store's part of a checkpoint."""


def load_data(config: ATSOConfig | dict[str, Any]) -> SemiSupervisedData:
    """Read and normalise ``config.data`` (a folder, list file or dict, or the Cityscapes form) with
    ``config.normalization`` (resolved here).

    Raises:
        ValueError: no ``data`` in the config, or see :func:`~atso_fast.train.data.load_raw`.
    """
    config = ATSOConfig.coerce(config)
    if config.data is None:
        raise ValueError("ATSO needs data: set config.data (folder, list file or dict) or pass data=")
    modality: str | None
    if isinstance(config.data, dict) and is_scene_spec(config.data):
        raw, modality = load_scene_raw(config.data)
    else:
        raw, modality = load_raw(
            config.data,
            in_channels=config.in_channels,
            num_classes=config.num_classes,
            ignore_index=config.ignore_index,
        )
    policy = resolve_normalization(config.normalization, raw["labelled"], modality)
    return prepare_data(raw, policy, modality)


def scene_sampler(
    config: ATSOConfig, images: Sequence[np.ndarray], labels: Sequence[np.ndarray]
) -> ScenePatches | None:
    """With ``augment: {kind: scene}``: the road-scene sampler over whole frames ``(3, 1, H, W)``
    (normalised with ``config.normalization``) and their labels ``(1, H, W)``; else None."""
    scene = SceneAugmentConfig.from_value(config.augment, config.patch_size, config.ignore_index)
    if scene is None:
        return None
    if not isinstance(config.normalization, dict):
        raise ValueError(f"the road-scene sampler needs a resolved normalization policy, got {config.normalization!r}")
    return ScenePatches(images, labels, scene, config.normalization)


def read_case_array(source: Any) -> np.ndarray:
    """An image or label given as an array, or as an ``.npy`` path (read into memory)."""
    return np.asarray(open_array(source)) if isinstance(source, (str, os.PathLike)) else source


class ArrayStore:
    """Every case and pseudo label in RAM (``storage="memory"``): the :class:`DataStore` of data
    loaded from ``config.data`` or passed as :class:`~atso_fast.train.data.SemiSupervisedData`.

    Pseudo labels are ``(Z, Y, X)`` uint8 arrays per unlabelled case (``pseudo``), with their
    confidence (``confidence``), M0's labels (``m0_labels``) and, for soft targets, the teacher's
    probabilities ``(C, Z, Y, X)`` float16 (``probs``); relabelling replaces arrays, never edits
    them in place. Checkpoints hold them all (format 3).

    Args:
        config: the run's config (``normalization`` and ``spacing`` are resolved from the data).
        data: the cases; default loaded from ``config.data`` (:func:`load_data`).

    Raises:
        ValueError: no data, or see :func:`load_data`.
    """

    in_memory = True
    checkpoints_phases = False
    format_version = 3

    def __init__(self, config: ATSOConfig, data: SemiSupervisedData | None = None) -> None:
        self.data = data if data is not None else load_data(config)
        self.config = replace(
            config,
            normalization=dict(self.data.normalization),
            spacing=config.spacing if config.spacing is not None else self.data.spacing,
            class_names=config.class_names
            or scene_class_names(config.data, config.num_classes)
            or dataset_class_names(config.data, config.num_classes),
        )
        cases = self.data.unlabelled
        self.unlabelled_names = [c.name or str(i) for i, c in enumerate(cases)]
        self.unlabelled_sizes = [int(c.image[0].size) for c in cases]
        self.val_cases = self.data.val
        self.soft = config.targets == "soft"
        n = len(cases)
        self.pseudo: list[np.ndarray | None] = [None] * n
        self.confidence: list[np.ndarray | None] = [None] * n
        self.probs: list[np.ndarray | None] = [None] * n  # (C, Z, Y, X) float16, soft targets only
        self.m0_labels: list[np.ndarray | None] = [None] * n
        self._labelled: Sampler | None = None

    # ------------------------------------------------------------------ reading
    def images(self, idx: Sequence[int]) -> list[np.ndarray]:
        return [self.data.unlabelled[i].image for i in idx]

    def truths(self, idx: Sequence[int]) -> list[np.ndarray | None]:
        return [self.data.unlabelled[i].label for i in idx]

    def labels(self, idx: Sequence[int]) -> list[np.ndarray | None]:
        return [self.pseudo[i] for i in idx]

    def case_batches(self, cases: Sequence[Any]) -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
        """All ``cases`` in one batch."""
        yield [read_case_array(c.image) for c in cases], [read_case_array(c.label) for c in cases]

    # ------------------------------------------------------------------ training
    def _sampler(self, images: list[np.ndarray], labels: list[np.ndarray]) -> Sampler:
        """Patches with foreground oversampling, or road-scene samples of whole frames."""
        cfg = self.config
        scene = scene_sampler(cfg, images, labels)
        if scene is not None:
            return scene
        return PatchSampler(
            images,
            labels,
            cfg.patch_size,
            num_classes=cfg.num_classes,
            foreground_oversample=cfg.foreground_oversample,
            ignore_index=cfg.ignore_index,
        )

    def labelled_sampler(self) -> Sampler:
        """Patches of L (built once)."""
        if self._labelled is None:
            cases = self.data.labelled
            self._labelled = self._sampler([c.image for c in cases], case_labels(cases, "labelled"))
        return self._labelled

    def target_sampler(self, idx: Sequence[int], *, truth: bool = False) -> Sampler:
        """The truth (``truth=True``), else the pseudo labels of ``idx`` with low-confidence
        voxels set to ``ignore_index`` (soft targets: the probabilities as extra image channels)."""
        cfg, cases = self.config, self.data.unlabelled
        if truth:
            return self._sampler([cases[i].image for i in idx], case_labels([cases[i] for i in idx], "unlabelled"))
        labels = []
        for i in idx:
            lab = _relabelled(self.pseudo, i, "pseudo label").copy()
            lab[low_confidence(lab, _relabelled(self.confidence, i, "confidence"), cfg.threshold)] = cfg.ignore_index
            labels.append(lab)
        images = [cases[i].image for i in idx]
        if self.soft:
            images = [
                np.concatenate([img, _relabelled(self.probs, i, "probabilities").astype(np.float32)])
                for img, i in zip(images, idx)
            ]
        return self._sampler(images, labels)

    def fit(
        self,
        model: nn.Module,
        batches: MixedBatches,
        *,
        key: tuple[int, int, int],
        steps: int,
        lr: float,
        on_step: Callable[[int, Any], None] | None = None,
        consistency: ConsistencyTerm | None = None,
        resume: dict[str, Any] | None = None,
        checkpoint: Callable[[dict[str, Any]], None] | None = None,
        **train_kwargs: Any,
    ) -> dict[str, float]:
        """:func:`~atso_fast.train.trainer.train_steps` with one generator seeded by ``key``
        (no mid-round state: ``resume`` must be None, ``checkpoint`` is never called)."""
        if resume is not None:
            raise ValueError("memory storage does not resume mid-round (the state holds optimiser state)")
        return train_steps(
            model,
            batches,
            steps=steps,
            lr=lr,
            rng=np.random.default_rng([int(v) for v in key]),
            consistency=consistency,
            on_step=on_step,
            **train_kwargs,
        )

    def export(self, model: nn.Module, k: int) -> None:
        """Nothing: the live model relabels."""

    # ------------------------------------------------------------------ relabelling
    def relabel(
        self,
        parts: Mapping[str, Sequence[int]],
        k: int,
        *,
        predict: Predict,
        known: dict[int, tuple[np.ndarray, ...]],
        resume: bool = False,
    ) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
        """Predict each part (one ``predict`` call per part, cases in ``known`` reused), measure
        the new labels against the current ones, then keep them; after the warm-up (``k == 0``)
        they are also M0's labels."""
        start = time.perf_counter()
        monitor = {}
        for name, idx in parts.items():
            todo = [i for i in idx if i not in known]
            if todo:
                known.update(zip(todo, predict(self.images(todo))))
            results = [known[i] for i in idx]
            monitor[name] = self._stats(idx, results)
            for i, res in zip(idx, results):
                self.pseudo[i], self.confidence[i] = res[0], res[1]
                if self.soft:
                    self.probs[i] = res[2]
        if k == 0:
            self.m0_labels = list(self.pseudo)
        voxels = sum(self.unlabelled_sizes[i] for idx in parts.values() for i in idx)
        return monitor, {"relabel": {"seconds": time.perf_counter() - start, "voxels": voxels}}

    def _stats(self, idx: Sequence[int], results: list[tuple[np.ndarray, ...]]) -> dict[str, float]:
        cfg = self.config
        stats = PseudoLabelStats(cfg.num_classes, ignore_index=cfg.ignore_index, threshold=cfg.threshold)
        for i, res in zip(idx, results):
            stats.add(
                res[0], res[1], previous=self.pseudo[i], m0=self.m0_labels[i], truth=self.data.unlabelled[i].label
            )
        return stats.result()

    def pseudo_dice(self) -> float:
        cfg = self.config
        dice = PooledDice(cfg.num_classes, ignore_index=cfg.ignore_index)
        for p, case in zip(self.pseudo, self.data.unlabelled):
            if p is not None and case.label is not None:
                dice.add(p, case.label)
        return dice.result()[1]

    def validation_package(self, k: int) -> None:
        """None: the live model validates."""
        return None

    def callback_fields(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Format 3: the pseudo labels, confidences, probabilities (soft targets) and M0's labels."""
        return {
            "format_version": self.format_version,
            "pseudo": _tensors(self.pseudo),
            "confidence": _tensors(self.confidence),
            "probs": _tensors(self.probs) if any(p is not None for p in self.probs) else None,
            "m0_labels": _tensors(self.m0_labels),
        }

    def check_state(self, state: dict[str, Any], *, subsets: dict[str, list[int]], needed: Sequence[int]) -> None:
        """Raises ValueError: another format, case count or normalisation, or missing pseudo
        labels (or probabilities, for soft targets) of the ``needed`` cases."""
        if state.get("format_version") != self.format_version:
            raise ValueError(
                f"unsupported ATSO state format {state.get('format_version')!r} (memory storage "
                f"reads {self.format_version}; a disk-storage checkpoint resumes with storage='disk')"
            )
        n = len(self.data.unlabelled)
        if len(state["pseudo"]) != n:
            raise ValueError(f"state has {len(state['pseudo'])} unlabelled cases, data has {n}")
        if state["config"]["normalization"] != self.config.to_dict()["normalization"]:
            raise ValueError(
                f"state normalization {state['config']['normalization']} differs from {self.config.normalization}"
            )
        missing = [i for i in needed if state["pseudo"][i] is None]
        if state["round"] >= 0 and missing:
            raise ValueError(f"state lacks pseudo labels for unlabelled cases {missing[:5]}")
        probs = state.get("probs") or [None] * len(state["pseudo"])
        if self.soft and state["round"] >= 0 and any(probs[i] is None for i in needed):
            raise ValueError(
                "state lacks the probabilities that soft targets need (run the warm-up with "
                "targets='soft', as run_methods does when any run uses them)"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = len(self.data.unlabelled)
        self.pseudo = _arrays(state["pseudo"], n)
        self.confidence = _arrays(state["confidence"], n)
        self.probs = _arrays(state["probs"], n) if self.soft else [None] * n
        self.m0_labels = _arrays(state["m0_labels"], n)


def _relabelled(arrays: Sequence[np.ndarray | None], i: int, what: str) -> np.ndarray:
    """``arrays[i]``, which relabelling (or a loaded checkpoint) sets."""
    array = arrays[i]
    if array is None:
        raise ValueError(f"unlabelled case {i} has no {what} yet (not relabelled)")
    return array


def _tensors(arrays: Sequence[np.ndarray | None]) -> list[torch.Tensor | None]:
    return [None if a is None else torch.from_numpy(np.ascontiguousarray(a).copy()) for a in arrays]


def _arrays(tensors: Sequence[torch.Tensor | None] | None, n: int) -> list[np.ndarray | None]:
    return [None] * n if tensors is None else [None if t is None else t.numpy().copy() for t in tensors]
