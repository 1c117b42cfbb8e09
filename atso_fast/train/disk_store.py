"""ATSO at archive scale: the on-disk :class:`~atso_fast.train.stores.DataStore`.

:class:`CacheStore` is what ``ATSO(config)`` uses when the config's storage resolves to
``"disk"`` (:func:`atso_fast.train.config.resolve_storage`). Cases are preprocessed once into a
cache (:mod:`atso_fast.train.cache`); the trainer reads patches out of core; each round exports
its model as a package and relabels through the bulk archive engine onto disk. The round engine
(:class:`atso_fast.train.atso.ATSO`) runs round ``k`` (0 is the warm-up) in phases and, with this
store, records each in ``OUT/checkpoint.pt`` when it ends, so a run killed anywhere resumes in the
phase it was in (``ATSO(config).run(resume=True)``, ``atso-fast train CONFIG --resume``)::

    train    patches of memory-mapped cases (DataLoader workers) -> fine-tune the student
             (:meth:`CacheStore.fit`; the optimiser state is also saved every ``checkpoint_every``
             steps)
    export   OUT/round_K/package: ONNX, verified, with the preprocessing spec (for raw scans),
             and OUT/round_K/grid_package: the same network for the cache's grid (no resampling
             or normalisation, the cache already has them: :func:`atso_fast.package.grid.grid_package`)
             (:meth:`CacheStore.export`)
    relabel  the archive engine over the round's held-out part: OUT/round_K/pseudo/<case>.npy and
             <case>_confidence.npy + manifest.jsonl (resumes through the manifest), then the
             foreground index OUT/round_K/pseudo/fg/ and the monitors (:meth:`CacheStore.relabel`);
             then validation with the round's grid_package
    done     metrics appended to OUT/metrics.jsonl, callbacks called

Layout of ``OUT``::

    cache/                 the preprocessing cache (atso_fast.train.cache), reused across runs
    round_0/ ... round_R/  package/, grid_package/, pseudo/ per round
    checkpoint.pt          model, optimizer (mid-round), round and phase, lineages: no data
    metrics.jsonl          one row per finished round

Pseudo labels are never all in memory: the sampler maps them one patch at a time, the monitors
read them one case at a time; each case's current label lives in the ``pseudo/`` folder of the
round that last relabelled it (``label_round``). Every random draw comes from generators seeded by
``(seed, round, purpose[, step])``, so a resumed run ends with the metrics of an uninterrupted
one (same device and threads; wall-clock fields ``seconds`` and ``timing`` aside).

Not on disk storage: soft targets and Mean Teacher (both need every unlabelled image in memory),
driving scenes (the Cityscapes data form and the road-scene augmentation: whole frames in memory),
and a custom ``relabeler`` (each round's exported package relabels). The student's start
agreement and the premise's trained side cost another engine pass over the training part each
round: on with ``monitor_on_disk: true`` (:meth:`CacheStore.start_agreement`,
:meth:`CacheStore.trained_side`), else NaN.

The kill -9 tests reach the phase boundaries through the seams :meth:`CacheStore._on_step`,
:meth:`CacheStore.export` and the module's :func:`local_engine` (``tests/kill_at.py``); no test
hook lives in the package.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from atso_fast.archive import relabel_archive
from atso_fast.engine.relabeler import Relabeler, relabeler_options
from atso_fast.io import atomic_write_bytes
from atso_fast.package import export_model
from atso_fast.package.grid import grid_package
from atso_fast.train.augment import augment_kind
from atso_fast.train.cache import Cache, CachedCase, build_cache, save_npy
from atso_fast.train.config import ATSOConfig
from atso_fast.train.data import (
    PatchCase,
    PatchSampler,
    dataset_class_names,
    locate_foreground,
    low_confidence,
    open_array,
    read_listing,
    view_array,
)
from atso_fast.train.loader import BatchDataset, make_loader
from atso_fast.train.monitor import PooledDice, PseudoLabelStats
from atso_fast.train.stores import Predict, read_case_array
from atso_fast.train.trainer import ConsistencyTerm, MixedBatches, train_loader

__all__ = ["CacheStore", "ArchiveEngine", "local_engine", "package_relabel_fn", "POOL_OPTIONS"]

log = logging.getLogger(__name__)

ArchiveEngine = Callable[..., dict[str, Any]]
"""``engine(package_dir, inputs, output_dir, *, options, resume, overwrite, save_confidence,
progress) -> summary`` (the summary of :func:`atso_fast.archive.relabel_archive`)."""

POOL_OPTIONS = ("address", "workers", "gpus_per_worker", "cpus_per_worker", "max_attempts")
"""``config.relabel`` keys a Ray archive engine takes for its pool, not the Relabeler."""


def local_engine(
    package_dir: Path, inputs: Sequence[Path], output_dir: Path, *, options: dict[str, Any], **kw: Any
) -> dict[str, Any]:
    """The threaded archive engine with ``Relabeler(package_dir, runtime="auto", **options)``."""
    relabeler = Relabeler(package_dir, **{"runtime": "auto", **options})
    return relabel_archive(relabeler, [str(p) for p in inputs], output_dir, **kw)


def package_relabel_fn(
    package: str | os.PathLike[str], config: ATSOConfig
) -> Callable[[Any, Sequence[np.ndarray]], list[tuple[np.ndarray, ...]]]:
    """A ``relabel_fn`` running an exported package (``auto`` runtime, ``config.relabel``'s
    Relabeler options; a Ray engine's pool options left out) on volumes already on its grid (a
    round's ``grid_package``); its model argument is unused.

    Raises:
        ValueError: an unknown ``config.relabel`` key, or an unloadable package.
    """
    engine = Relabeler(
        Path(package),
        **{
            "runtime": "auto",
            **relabeler_options(config.relabel, ignore=POOL_OPTIONS),
            "threshold": 0.0,
            "ignore_index": config.ignore_index,
        },
    )

    def relabel(_model: Any, volumes: Sequence[np.ndarray]) -> list[tuple[np.ndarray, ...]]:
        results = [engine.relabel_volume(v) for v in volumes]
        return [(r.labels, r.confidence) for r in results]

    return relabel


class CacheStore:
    """Cases and pseudo labels on disk (``storage="disk"``): the :class:`~atso_fast.train.stores.DataStore`
    of data named by ``config.data`` (a folder, list file or dict), with ``config.out_dir``.

    Args:
        config: the run's config (normalisation, spacing and preprocessing are resolved by the
            cache).
        archive_engine: each round's bulk relabel engine (:data:`ArchiveEngine`); default
            :func:`local_engine` (the CLI's ``--engine ray`` passes the Ray engine).
        data, relabeler: must be None (the data are ``config.data``; each round's package
            relabels); given only to be refused with a message naming them.

    Raises:
        ValueError: no ``out_dir`` or ``data``, data or a relabeler passed, soft targets, Mean
            Teacher, a bad data listing or case (see :func:`~atso_fast.train.cache.build_cache`).
    """

    in_memory = False
    checkpoints_phases = True
    format_version = "disk-2"

    def __init__(
        self,
        config: ATSOConfig,
        *,
        archive_engine: ArchiveEngine | None = None,
        data: Any = None,
        relabeler: Any = None,
    ) -> None:
        if (
            config.out_dir is None
            or data is not None
            or config.data is None
            or relabeler is not None
            or config.targets != "hard"
        ):
            raise ValueError(
                "disk storage needs config.data on disk, config.out_dir, hard targets, and no data= or "
                f"relabeler= (got out_dir={config.out_dir!r}, data passed: {data is not None}, "
                f"targets={config.targets!r}, relabeler passed: {relabeler is not None})"
            )
        if config.method == "mean-teacher":
            raise ValueError(
                "method 'mean-teacher' runs on memory storage only (storage='memory'): its teacher "
                "needs the unlabelled images in every batch, not pseudo labels on disk"
            )
        if augment_kind(config.augment) == "scene":
            raise ValueError(
                "the road-scene augmentation (augment kind 'scene') samples whole RGB frames in memory: "
                "run it with storage='memory' (driving-scene frames are small)"
            )
        self.out = Path(config.out_dir)
        listing, base = read_listing(config.data)
        self.cache: Cache = build_cache(
            listing,
            base,
            config.cache_dir or self.out / "cache",
            window=config.patch_size,
            in_channels=config.in_channels,
            num_classes=config.num_classes,
            normalization=config.normalization,
            spacing=config.spacing,
            preprocessing=config.preprocessing,
        )
        self.config = replace(
            config,
            normalization=self.cache.normalization,
            spacing=self.cache.spacing,
            preprocessing=self.cache.preprocessing,
            class_names=config.class_names or dataset_class_names(config.data, config.num_classes),
        )
        self.engine = archive_engine or local_engine
        self.unlabelled: list[CachedCase] = self.cache.cases["unlabelled"]
        self.unlabelled_names = [c.case_id for c in self.unlabelled]
        self.unlabelled_sizes = [c.voxels for c in self.unlabelled]
        self.val_cases = self.cache.cases["val"]
        self.label_round: list[int | None] = [None] * len(self.unlabelled)  # whose pseudo/ holds the label

    # ------------------------------------------------------------------ paths and cases
    def round_dir(self, k: int) -> Path:
        """``OUT/round_K``: round ``k``'s packages and pseudo labels."""
        return self.out / f"round_{k}"

    def _label_case(self, i: int) -> PatchCase | None:
        """Unlabelled case ``i`` with its latest pseudo label (None: not relabelled yet)."""
        k = self.label_round[i]
        return None if k is None else self._round_case(i, k)

    def _round_case(self, i: int, k: int) -> PatchCase:
        """Unlabelled case ``i`` with its pseudo label of round ``k``."""
        case, folder = self.unlabelled[i], self.round_dir(k) / "pseudo"
        meta = json.loads((folder / "fg" / f"{case.case_id}.json").read_text())
        return PatchCase(
            case.image,
            folder / f"{case.case_id}.npy",
            case.shape,
            folder / "fg" / f"{case.case_id}.npy",
            {int(c): int(v) for c, v in meta.items()},
            folder / f"{case.case_id}_confidence.npy",
        )

    @staticmethod
    def _truth_case(case: CachedCase) -> PatchCase:
        if case.label is None:
            raise ValueError(f"case {case.case_id} has no label in the cache")
        return PatchCase(case.image, case.label, case.shape, case.fg, dict(case.fg_counts))

    def images(self, idx: Sequence[int]) -> list[np.ndarray]:
        return [open_array(self.unlabelled[i].image) for i in idx]

    def truths(self, idx: Sequence[int]) -> list[np.ndarray | None]:
        cases = [self.unlabelled[i] for i in idx]
        return [None if c.label is None else open_array(c.label) for c in cases]

    def labels(self, idx: Sequence[int]) -> list[np.ndarray | None]:
        cases = [self._label_case(i) for i in idx]
        return [None if c is None else view_array(c.label) for c in cases]

    def case_batches(self, cases: Sequence[Any]) -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
        """One case at a time, read into memory."""
        for case in cases:
            yield [read_case_array(case.image)], [read_case_array(case.label)]

    # ------------------------------------------------------------------ training
    def _sampler(self, cases: list[PatchCase], threshold: float | list[float] = 0.0) -> PatchSampler:
        cfg = self.config
        return PatchSampler.from_cases(
            cases,
            cfg.patch_size,
            foreground_oversample=cfg.foreground_oversample,
            ignore_index=cfg.ignore_index,
            threshold=threshold,
        )

    def labelled_sampler(self) -> PatchSampler:
        return self._sampler([self._truth_case(c) for c in self.cache.cases["labelled"]])

    def target_sampler(self, idx: Sequence[int], *, truth: bool = False) -> PatchSampler:
        """The truth (``truth=True``), else the latest pseudo labels of ``idx``, thresholded as
        each patch is cut."""
        if truth:
            return self._sampler([self._truth_case(self.unlabelled[i]) for i in idx])
        return self._sampler([self._pseudo_case(i) for i in idx], self.config.threshold)

    def _pseudo_case(self, i: int) -> PatchCase:
        """Unlabelled case ``i`` with its latest pseudo label, which it must have."""
        case = self._label_case(i)
        if case is None:
            raise ValueError(f"unlabelled case {i} has no pseudo label yet (not relabelled)")
        return case

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
        """:func:`~atso_fast.train.trainer.train_loader` over a ``DataLoader`` whose batch ``s`` is
        drawn from a generator seeded by ``(*key, s)`` (``loader_workers`` processes), from step
        ``resume["step"]`` on; ``checkpoint(state)`` every ``checkpoint_every`` steps."""
        cfg, k = self.config, int(key[1])
        loader = make_loader(
            BatchDataset(batches, key, steps),
            start=0 if resume is None else resume["step"],
            workers=cfg.loader_workers,
            device=cfg.device,
            seed=cfg.seed,
            k=k,
        )
        return train_loader(
            model,
            loader,
            steps=steps,
            lr=lr,
            resume=resume,
            consistency=consistency,
            on_step=self._on_step(k, steps, on_step, checkpoint),
            **train_kwargs,
        )

    def _on_step(
        self,
        k: int,
        steps: int,
        progress: Callable[[int, Any], None] | None,
        checkpoint: Callable[[dict[str, Any]], None] | None,
    ) -> Callable[[int, Any], None]:
        """After every step: a log line every tenth of the steps, ``progress``, and the
        optimiser state to ``checkpoint`` every ``checkpoint_every`` steps (not after the last)."""
        every, report = int(self.config.checkpoint_every), max(1, steps // 10)

        def on_step(step: int, run: Any) -> None:
            if step % report == 0 or step == steps:
                log.info("round %d: train step %d/%d, loss %.4f", k, step, steps, float(run.losses[-1]))
            if progress is not None:
                progress(step, run)
            if checkpoint is not None and every and step % every == 0 and step < steps:
                checkpoint(run.state(step))

        return on_step

    def export(self, model: nn.Module, k: int) -> None:
        """``round_K/package`` (for raw scans) and ``round_K/grid_package`` (for the cache grid)."""
        self._export_to(model, self.round_dir(k), k)

    def _export_to(self, model: nn.Module, folder: Path, k: int) -> None:
        """``folder/package`` and ``folder/grid_package`` of ``model``."""
        cfg = self.config
        if not isinstance(cfg.normalization, dict):  # resolved by the cache in __init__
            raise ValueError(f"export needs a resolved normalization policy, got {cfg.normalization!r}")
        package = export_model(
            model,
            folder / "package",
            window=list(cfg.patch_size),
            num_classes=cfg.num_classes,
            kind="logits",
            normalization=cfg.normalization,
            in_channels=cfg.in_channels,
            spacing=cfg.spacing,
            preprocessing=cfg.preprocessing,
            class_names=cfg.class_names,
            extra={"source": {"atso_round": k, "method": cfg.method}},
            save_torch=False,
        )
        grid_package(package, folder / "grid_package")

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
        """The archive engine with round ``k``'s ``grid_package`` over every part at once, into
        ``round_K/pseudo`` (``resume``: through its manifest), then the foreground index and the
        monitors per part; the new labels become current. ``predict`` and ``known`` are unused
        (the exported package relabels)."""
        idx = sorted(i for part in parts.values() for i in part)
        pseudo_dir = self.round_dir(k) / "pseudo"
        summary, timing = self._run_engine(idx, pseudo_dir, resume=resume)
        monitor = {name: self._stats(part, k) for name, part in parts.items()}
        for i in idx:
            self.label_round[i] = k
        return monitor, {
            "relabel": summary,
            "package": f"round_{k}/package",
            "pseudo_dir": f"round_{k}/pseudo" if idx else None,
            "timing": timing,
        }

    def start_agreement(self, model: nn.Module, idx: Sequence[int], k: int) -> float:
        """The student's start agreement (``ATSOConfig.monitor_on_disk``): ``model`` as it enters
        round ``k``, exported under ``round_K/student`` (removed after), over the part it is about
        to train on; hard Dice of its labels against the current labels there."""
        idx = sorted(idx)
        if not idx:
            return math.nan
        cfg, folder = self.config, self.round_dir(k) / "student"
        self._export_to(model, folder, k)
        self._run_engine(idx, folder / "labels", resume=False, index=False)
        dice = PooledDice(cfg.num_classes, ignore_index=cfg.ignore_index)
        for i in idx:
            labels = view_array(self._pseudo_case(i).label)
            dice.add(
                np.asarray(view_array(folder / "labels" / f"{self.unlabelled[i].case_id}.npy")), np.asarray(labels)
            )
        shutil.rmtree(folder, ignore_errors=True)
        return dice.result()[1]

    def trained_side(self, idx: Sequence[int], k: int, *, resume: bool = False) -> dict[str, float]:
        """The premise's trained side (``ATSOConfig.monitor_on_disk``): round ``k``'s package over
        the part it trained on once more, into ``round_K/premise`` (removed after), then, streamed
        case by case, the Dice of the labels it trained on and of its own labels against the truth,
        and their agreement; ``{}`` when a case has no truth."""
        idx = sorted(idx)
        truths = [c.label for c in (self.unlabelled[i] for i in idx) if c.label is not None]
        if not idx or len(truths) != len(idx):
            return {}
        cfg = self.config
        folder = self.round_dir(k) / "premise"
        self._run_engine(idx, folder, resume=resume, index=False)
        dice = {key: PooledDice(cfg.num_classes, ignore_index=cfg.ignore_index) for key in ("label", "model", "agree")}
        for i, truth_file in zip(idx, truths):
            case = self.unlabelled[i]
            truth, model = open_array(truth_file), view_array(folder / f"{case.case_id}.npy")
            labels = view_array(self._pseudo_case(i).label)
            dice["label"].add(np.asarray(labels), truth)
            dice["model"].add(np.asarray(model), truth)
            dice["agree"].add(np.asarray(model), np.asarray(labels))
        shutil.rmtree(folder, ignore_errors=True)
        return {
            "label_dice": dice["label"].result()[1],
            "model_dice": dice["model"].result()[1],
            "agreement": dice["agree"].result()[1],
        }

    def _run_engine(
        self, idx: list[int], pseudo_dir: Path, *, resume: bool, index: bool = True
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The archive engine over the cached images of ``idx``, then (``index``) their
        foreground index. Returns ``(summary, wall-clock figures)``."""
        if not idx:
            return {"cases": 0, "voxels": 0, "runtime": None}, {}
        cfg = self.config
        options = {"threshold": 0.0, "ignore_index": cfg.ignore_index, **cfg.relabel}
        summary = self.engine(
            pseudo_dir.parent / "grid_package",
            [self.unlabelled[i].image for i in idx],
            pseudo_dir,
            options=options,
            resume=resume,
            overwrite=not resume,
            save_confidence=True,
            progress=None,
        )
        if summary["failed"]:
            raise ValueError(
                f"relabelling into {pseudo_dir} failed for {summary['failed']} cases: {summary['failures'][:3]}"
            )
        log.info(
            "relabelled %d cases into %s (%d done before): %.2f cases/s, runtime %s, busy %.0f%%",
            summary["done"],
            pseudo_dir,
            summary["skipped"],
            summary["cases_per_s"],
            summary.get("runtime"),
            100 * summary["busy_fraction"],
        )
        for i in idx if index else ():
            self._index_pseudo(self.unlabelled[i], pseudo_dir)
        timing = {
            "relabel_engine_s": summary["seconds"],
            "relabel_done": summary["done"],
            "relabel_skipped": summary["skipped"],
            "relabel_cases_per_s": summary["cases_per_s"],
            "relabel_busy_fraction": summary["busy_fraction"],
        }
        return {
            "cases": len(idx),
            "voxels": sum(self.unlabelled_sizes[i] for i in idx),
            "runtime": summary.get("runtime"),
        }, timing

    def _index_pseudo(self, case: CachedCase, folder: Path) -> None:
        """``fg/<case>.npy`` (foreground of the thresholded pseudo label) and ``fg/<case>.json``."""
        cfg = self.config
        label = np.array(open_array(folder / f"{case.case_id}.npy"))
        if cfg.threshold != 0.0:
            label[low_confidence(label, open_array(folder / f"{case.case_id}_confidence.npy"), cfg.threshold)] = (
                cfg.ignore_index
            )
        fg, counts = locate_foreground(label, cfg.num_classes)
        save_npy(folder / "fg" / f"{case.case_id}.npy", fg)
        atomic_write_bytes(folder / "fg" / f"{case.case_id}.json", json.dumps(counts).encode())

    def _stats(self, idx: Sequence[int], k: int) -> dict[str, float]:
        """The monitors of one part, streamed case by case from the label files."""
        cfg = self.config
        stats = PseudoLabelStats(cfg.num_classes, ignore_index=cfg.ignore_index, threshold=cfg.threshold)
        for i in idx:
            new = self._round_case(i, k)
            previous = self._label_case(i)
            m0 = self._round_case(i, 0) if k > 0 else None
            truth = self.unlabelled[i].label
            assert new.confidence is not None  # _round_case always names the confidence file
            stats.add(
                view_array(new.label),
                view_array(new.confidence),
                previous=None if previous is None else view_array(previous.label),
                m0=None if m0 is None else view_array(m0.label),
                truth=None if truth is None else open_array(truth),
            )
        return stats.result()

    def pseudo_dice(self) -> float:
        cfg = self.config
        dice = PooledDice(cfg.num_classes, ignore_index=cfg.ignore_index)
        for i, case in enumerate(self.unlabelled):
            k = self.label_round[i]
            if case.label is not None and k is not None:
                dice.add(np.asarray(view_array(self._round_case(i, k).label)), open_array(case.label))
        return dice.result()[1]

    def validation_package(self, k: int) -> Path:
        """Round ``k``'s ``grid_package``: what the round exported is what is validated."""
        return self.round_dir(k) / "grid_package"

    def callback_fields(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """``package_path`` and ``pseudo_path``: the row's ``package`` and ``pseudo_dir``, absolute."""
        return {
            "package_path": str(self.out / metrics["package"]),
            "pseudo_path": str(self.out / metrics["pseudo_dir"]) if metrics["pseudo_dir"] else None,
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Format ``disk-2``: the cases and cache spec the run belongs to, and where each pseudo
        label lives; no data."""
        return {
            "format_version": self.format_version,
            "case_ids": list(self.unlabelled_names),
            "cache_spec_sha256": self.cache.spec_sha256,
            "label_round": list(self.label_round),
        }

    def check_state(self, state: dict[str, Any], *, subsets: dict[str, list[int]], needed: Sequence[int]) -> None:
        """Raises ValueError: a state of another format, method, init, cases, split or
        preprocessing (only the same run resumes on disk: its labels live in its ``out_dir``)."""
        if state.get("format_version") != self.format_version:
            raise ValueError(
                f"checkpoint format {state.get('format_version')!r} is not a disk-storage ATSO state "
                f"({self.format_version}); a memory-storage checkpoint resumes with storage='memory'"
            )
        cfg = self.config
        same = (state["method"], state["config"]["init"]) == (cfg.method, cfg.init)
        if not same or state["case_ids"] != self.unlabelled_names or state["subsets"] != subsets:
            raise ValueError(
                f"checkpoint of method {state['method']!r} (init {state['config']['init']!r}) on "
                f"{len(state['case_ids'])} unlabelled cases cannot resume method {cfg.method!r} "
                f"(init {cfg.init!r}) on {len(self.unlabelled)} cases with this split"
            )
        if state["cache_spec_sha256"] != self.cache.spec_sha256:
            raise ValueError(
                "checkpoint was trained on another preprocessing (normalisation, spacing or spec) than this run's cache"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.label_round = list(state["label_round"])
