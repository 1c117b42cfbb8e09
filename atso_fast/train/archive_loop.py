"""ATSO at archive scale: every round exports a model package, relabels through the bulk engine
onto disk, and the trainer reads cases and pseudo labels out of core.

``ATSO(config)`` builds an :class:`ArchiveATSO` when the config's storage resolves to ``"disk"``
(:func:`atso_fast.train.atso.resolve_storage`). Round ``k`` (0 is the warm-up) runs four phases,
each recorded in ``OUT/checkpoint.pt`` when it ends, so a run killed anywhere resumes in the
phase it was in (``ATSO(config).run(resume=True)``, ``atso-fast train CONFIG --resume``)::

    train    patches of memory-mapped cases (DataLoader workers) -> fine-tune the student
    export   OUT/round_K/package: ONNX, verified, with the preprocessing spec (for raw scans),
             and OUT/round_K/grid_package: the same network for the cache's grid (no resampling
             or normalisation, the cache already has them)
    relabel  relabel_archive of the round's held-out part: OUT/round_K/pseudo/<case>.npy and
             <case>_confidence.npy + manifest.jsonl (resumes through the manifest), then the
             foreground index OUT/round_K/pseudo/fg/ and the monitors, and validation
    done     metrics appended to OUT/metrics.jsonl, callbacks called

Layout of ``OUT``::

    cache/                 the preprocessing cache (atso_fast.train.cache), reused across runs
    round_0/ ... round_R/  package/, grid_package/, pseudo/ per round
    checkpoint.pt          model, optimizer (mid-round), round and phase, lineages: no data
    metrics.jsonl          one row per finished round

Pseudo labels are never all in memory: the sampler maps them one patch at a time; each case's
current label lives in the ``pseudo/`` folder of the round that last relabelled it. Every
random draw comes from generators seeded by ``(seed, round, purpose[, step])``, so a resumed
run ends with the metrics of an uninterrupted one (same device and threads; wall-clock fields
``seconds`` and ``timing`` aside).

Not on disk storage: soft targets (``targets="soft"`` needs the memory path) and the
``start_agreement`` monitor (it would cost an extra inference pass over the training part each
round; it is NaN here).

The kill -9 tests reach the phase boundaries through the seams ``ArchiveATSO._on_step``,
``ArchiveATSO._export_phase`` and the module's ``local_engine`` (``tests/kill_at.py``); no test
hook lives in the package.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atso_fast.archive import relabel_archive
from atso_fast.engine.relabeler import Relabeler, relabeler_options
from atso_fast.io import atomic_write_bytes
from atso_fast.package import export_model
from atso_fast.package.spec import default_preprocessing
from atso_fast.progress import Progress
from atso_fast.train.atso import (
    _TRAIN,
    ATSO,
    ATSOConfig,
    _nan_to_none,
    _state_copy,
    build_model,
    default_relabel_fn,
    load_pretrained,
    model_name,
    plan_round,
    premise,
    register_storage,
    split_balanced,
    subset_names,
)
from atso_fast.train.augment import AugmentConfig
from atso_fast.train.cache import (
    Cache,
    CachedCase,
    build_cache,
    locate_foreground,
    save_npy,
)
from atso_fast.train.data import dataset_class_names, low_confidence, read_listing
from atso_fast.train.loader import (
    BatchDataset,
    DiskCase,
    DiskSampler,
    make_loader,
    open_array,
)
from atso_fast.train.losses import confusion_counts, dice_from_counts
from atso_fast.train.metrics import as_case_maps, case_metrics, case_summary, combine_case_metrics
from atso_fast.train.trainer import MixedBatches, train_loader

__all__ = ["ArchiveATSO", "ArchiveEngine", "local_engine"]

log = logging.getLogger(__name__)

_FORMAT = "disk-2"
_PHASES = ("train", "export", "relabel", "done")

ArchiveEngine = Callable[..., dict[str, Any]]
"""``engine(package_dir, inputs, output_dir, *, options, resume, overwrite, save_confidence,
progress) -> summary`` (the summary of :func:`atso_fast.archive.relabel_archive`)."""


def local_engine(package_dir: Path, inputs: Sequence[Path], output_dir: Path, *, options: dict[str, Any],
                 **kw: Any) -> dict[str, Any]:
    """The threaded archive engine with ``Relabeler(package_dir, runtime="auto", **options)``."""
    relabeler = Relabeler(package_dir, **{"runtime": "auto", **options})
    return relabel_archive(relabeler, [str(p) for p in inputs], output_dir, **kw)


class ArchiveATSO(ATSO):
    """:class:`~atso_fast.train.atso.ATSO` on data on disk (``storage="disk"``); same methods,
    same metrics, plus each round's ``package`` and ``pseudo_dir`` (relative to ``out_dir``).

    Args:
        config: :class:`ATSOConfig` (or dict) with ``data`` on disk and ``out_dir``.
        model: as :class:`ATSO`.
        relabeler: unused on disk (the round's exported package relabels); must be None.
        data: must be None (the data are ``config.data``).
        callbacks: ``fn(atso, metrics)`` after the warm-up and every round; ``metrics`` then also
            holds ``package_path`` and ``pseudo_path`` (absolute).
        archive_engine: see :data:`ArchiveEngine`; default :func:`local_engine`.

    Raises:
        ValueError: no out_dir, data passed in memory, soft targets, a custom relabeler, bad data.
    """

    def __init__(self, config: ATSOConfig | dict[str, Any], model: torch.nn.Module | None = None,
                 relabeler: Any = None, *, data: Any = None, callbacks: Sequence[Any] = (),
                 archive_engine: ArchiveEngine | None = None) -> None:
        config = ATSOConfig.coerce(config)
        if config.out_dir is None or data is not None or config.data is None or relabeler is not None \
                or config.targets != "hard":
            raise ValueError("disk storage needs config.data on disk, config.out_dir, hard targets, and no data= or "
                             f"relabeler= (got out_dir={config.out_dir!r}, data passed: {data is not None}, "
                             f"targets={config.targets!r}, relabeler passed: {relabeler is not None})")
        if config.method == "mean-teacher":
            raise ValueError("method 'mean-teacher' runs on memory storage only (storage='memory'): its teacher "
                             "needs the unlabelled images in every batch, not pseudo labels on disk")
        self.out = Path(config.out_dir)
        listing, base = read_listing(config.data)
        self.cache: Cache = build_cache(
            listing, base, config.cache_dir or self.out / "cache", window=config.patch_size,
            in_channels=config.in_channels, num_classes=config.num_classes, normalization=config.normalization,
            spacing=config.spacing, preprocessing=config.preprocessing)
        self.config = replace(config, normalization=self.cache.normalization, spacing=self.cache.spacing,
                              preprocessing=self.cache.preprocessing,
                              class_names=config.class_names or dataset_class_names(config.data, config.num_classes))
        self.model = model if model is not None else build_model(self.config)
        if self.config.pretrained is not None:
            load_pretrained(self.model, self.config.pretrained)
        self.init_state = _state_copy(self.model)  # theta0
        self.soft, self.callbacks = False, list(callbacks)
        self.relabel_fn = default_relabel_fn(self.config)  # predict(): the live model through the engine
        self.engine = archive_engine or local_engine
        self.unlabelled: list[CachedCase] = self.cache.cases["unlabelled"]
        self.subsets = self._make_subsets()
        self.round_index, self.phase = -1, "train"
        n = len(self.unlabelled)
        self.labelled_by: list[str | None] = [None] * n
        self.label_round: list[int | None] = [None] * n  # the round whose pseudo/ holds the case's label
        self.history: list[dict[str, Any]] = []
        self.base_state: dict[str, torch.Tensor] | None = None
        self.lineages: dict[str, dict[str, Any]] = {}
        self.pending: dict[str, Any] = {}  # metrics of the round in progress
        self.train_state: dict[str, Any] | None = None  # mid-round optimiser state
        self._resumed_phase: str | None = None

    def _make_subsets(self) -> dict[str, list[int]]:
        cfg, cases = self.config, self.unlabelled
        n = len(cases)
        if cfg.method == "supervised":
            return {}
        if cfg.method in ("oracle", "self-training"):
            missing = [c.case_id for c in cases if c.label is None] if cfg.method == "oracle" else []
            if n < 1 or missing:
                raise ValueError(f"method {cfg.method!r} needs at least 1 unlabelled case (oracle: with true labels); "
                                 f"got {n}, without a label: {missing[:5]}")
            return {"U": list(range(n))}
        if n < cfg.num_subsets:
            raise ValueError(f"method 'atso' needs at least {cfg.num_subsets} unlabelled cases to split into "
                             f"{cfg.num_subsets} parts, got {n}")
        parts = split_balanced([c.voxels for c in cases], cfg.seed, cfg.num_subsets)
        return dict(zip(subset_names(cfg.num_subsets), parts))

    # ------------------------------------------------------------------ paths
    def round_dir(self, k: int) -> Path:
        return self.out / f"round_{k}"

    def _label_case(self, i: int, k: int | None = None) -> DiskCase | None:
        """Unlabelled case ``i`` with its pseudo label of round ``k`` (default: its latest)."""
        k = self.label_round[i] if k is None else k
        if k is None:
            return None
        case, folder = self.unlabelled[i], self.round_dir(k) / "pseudo"
        meta = json.loads((folder / "fg" / f"{case.case_id}.json").read_text())
        return DiskCase(case.image, folder / f"{case.case_id}.npy", case.shape, folder / "fg" / f"{case.case_id}.npy",
                        {int(c): int(v) for c, v in meta.items()}, folder / f"{case.case_id}_confidence.npy")

    @staticmethod
    def _truth_case(case: CachedCase) -> DiskCase:
        return DiskCase(case.image, case.label, case.shape, case.fg, dict(case.fg_counts))

    # ------------------------------------------------------------------ stages
    def warmup(self) -> dict[str, Any]:
        """Supervised training on L (M0), export, pseudo labels for every subset. Returns metrics."""
        if self.round_index >= 0:
            raise RuntimeError("warm-up already done (round_index >= 0)")
        return self._run_round(0)

    def round(self) -> dict[str, Any]:
        """Run the next round (student, fine-tune, export, relabel per :func:`plan_round`)."""
        if self.round_index < 0:
            raise RuntimeError("call warmup() before round()")
        if self.round_index >= self.config.rounds:
            raise RuntimeError(f"all {self.config.rounds} rounds are done")
        return self._run_round(self.round_index + 1)

    def consolidate(self) -> dict[str, Any]:
        """The final student on L + all of U with the final labels (exported, relabels nothing)."""
        if self.round_index != self.config.rounds:
            raise RuntimeError(f"consolidate() follows the last round ({self.config.rounds}); the run is at "
                               f"{self.round_index}")
        return self._run_round(self.config.rounds + 1)

    def _run_round(self, k: int) -> dict[str, Any]:
        """The phases of round ``k`` from the one it is in (resumed runs re-enter it)."""
        if self.phase == "train":
            self._train_phase(k)
            self._enter("export")
        if self.phase == "export":
            self._export_phase(k)
            self._enter("relabel")
        return self._relabel_phase(k)

    def _enter(self, phase: str) -> None:
        self.phase = phase
        self.save_checkpoint()

    def _plan(self, k: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if k == 0:
            return (), tuple(self.subsets)
        if k > self.config.rounds:  # consolidation
            return tuple(self.subsets), ()
        return plan_round(self.config.method, k, self.config.num_subsets)

    def _train_phase(self, k: int) -> None:
        cfg, start = self.config, time.perf_counter()
        train_on, relabel = self._plan(k)
        if self.train_state is None:  # a fresh start of the phase (not a mid-round resume)
            stage = "warm-up" if k == 0 else "consolidate" if k > cfg.rounds else "round"
            self.pending = {"round": k, "stage": stage, "method": cfg.method, "model": model_name(k, cfg.rounds),
                            "student_from": None,
                            "trained_on": ["L", *train_on], "train_labels_from": self._labels_from(train_on),
                            "student": {}, "timing": {}}
            if k > 0:
                self.pending["student_from"] = self._start_student(k, relabel)
        idx = sorted(i for name in train_on for i in self.subsets[name])
        pseudo = self._pseudo_sampler(idx)
        if k > 0 and self.train_state is None:
            self.pending["student"] = {"pre_loss": self._pre_loss(pseudo, k) if pseudo is not None else None,
                                       "start_agreement": None}
        steps, lr = self.schedule(k)
        loader = make_loader(BatchDataset(self._batches(pseudo, k), (cfg.seed, k, _TRAIN), steps),
                             start=0 if self.train_state is None else self.train_state["step"],
                             workers=cfg.loader_workers, device=cfg.device, seed=cfg.seed, k=k)
        stats = train_loader(self.model, loader, steps=steps, lr=lr, resume=self.train_state,
                             on_step=self._on_step(k, steps), **self._train_kwargs())
        self.train_state = None
        if k == 0:
            self.base_state = _state_copy(self.model)
        if cfg.init == "lineage" and k > 0 and relabel:
            self.lineages[relabel[0]] = {"model": model_name(k, cfg.rounds), "state": _state_copy(self.model)}
        self.pending["train"] = stats
        if k > 0:
            self.pending["student"].update({key: stats[key] for key in
                                            ("pseudo_loss", "pseudo_first_loss", "pseudo_last_loss")})
        self.pending["timing"]["train_s"] = self.pending["timing"].get("train_s", 0.0) + time.perf_counter() - start

    def _on_step(self, k: int, steps: int) -> Callable[[int, Any], None]:
        cfg = self.config
        every, report = int(cfg.checkpoint_every), max(1, steps // 10)
        phase = "warm-up on L" if k == 0 else "consolidate: fine-tune" if k > cfg.rounds else \
            f"round {k}/{cfg.rounds}: fine-tune"
        progress = Progress(f"{cfg.method} {phase}", steps, enabled=cfg.progress)

        def on_step(step: int, run: Any) -> None:
            if step % report == 0 or step == steps:
                log.info("round %d: train step %d/%d, loss %.4f", k, step, steps, float(run.losses[-1]))
            progress.update(step)
            if every and step % every == 0 and step < steps:
                self.train_state = run.state(step)
                self.save_checkpoint()
                self.train_state = None

        return on_step

    def _batches(self, pseudo: DiskSampler | None, k: int) -> MixedBatches:  # type: ignore[override]
        cfg = self.config
        labelled = self._sampler([self._truth_case(c) for c in self.cache.cases["labelled"]])
        matched = cfg.method == "supervised" and cfg.supervised_batch == "matched" and k > 0
        return MixedBatches(labelled, pseudo, cfg.batch_size, labelled_ratio=cfg.labelled_ratio,
                            augment=AugmentConfig.from_value(cfg.augment), labelled_only=matched)

    def _sampler(self, cases: list[DiskCase], threshold: float = 0.0) -> DiskSampler:  # type: ignore[override]
        cfg = self.config
        return DiskSampler(cases, cfg.patch_size, foreground_oversample=cfg.foreground_oversample,
                           ignore_index=cfg.ignore_index, threshold=threshold)

    def _pseudo_sampler(self, idx: list[int]) -> DiskSampler | None:  # type: ignore[override]
        """Sampler over the targets of ``idx``: the truth (oracle), else the latest pseudo labels
        (voxels below the confidence threshold -> ignore_index)."""
        if not idx:
            return None
        if self.config.method == "oracle":
            return self._sampler([self._truth_case(self.unlabelled[i]) for i in idx])
        return self._sampler([self._label_case(i) for i in idx], self.config.threshold)

    def _export_phase(self, k: int) -> None:
        """``round_K/package`` (for raw scans) and ``round_K/grid_package`` (for the cache grid)."""
        start, cfg = time.perf_counter(), self.config
        folder = self.round_dir(k)
        package = export_model(self.model, folder / "package", window=list(cfg.patch_size),
                               num_classes=cfg.num_classes, kind="logits", normalization=cfg.normalization,
                               in_channels=cfg.in_channels, spacing=cfg.spacing, preprocessing=cfg.preprocessing,
                               class_names=cfg.class_names,
                               extra={"source": {"atso_round": k, "method": cfg.method}}, save_torch=False)
        _grid_package(package, folder / "grid_package")
        self.pending["timing"]["export_s"] = time.perf_counter() - start

    def _relabel_phase(self, k: int) -> dict[str, Any]:
        start = time.perf_counter()
        _, names = self._plan(k)
        model_id = model_name(k, self.config.rounds)
        idx = sorted(i for n in names for i in self.subsets[n])
        pseudo_dir = self.round_dir(k) / "pseudo"
        summary = self._relabel(idx, pseudo_dir, resumed=self._resumed_phase == "relabel")
        monitor = {n: self._pseudo_stats(self.subsets[n], k) for n in names}
        for i in idx:
            self.label_round[i], self.labelled_by[i] = k, model_id
        metrics = {**self.pending, "relabelled": list(names), "relabelled_by": model_id if names else None,
                   "monitor": monitor, "relabel": summary, "pseudo_dice_all": self._pseudo_dice_all(),
                   "package": f"round_{k}/package", "pseudo_dir": f"round_{k}/pseudo" if idx else None}
        for name in metrics["trained_on"][1:]:
            metrics["monitor"].setdefault(name, {})["pre_loss"] = metrics["student"].get("pre_loss")
        # the trained part's side of the premise needs another pass over it: memory storage only
        metrics["premise"] = premise({}, [monitor[n] for n in names])
        metrics["timing"]["relabel_s"] = time.perf_counter() - start
        return self._finish_round(metrics)

    def _relabel(self, idx: list[int], pseudo_dir: Path, *, resumed: bool) -> dict[str, Any]:
        """The archive engine over the cached images of ``idx``, then their foreground index.
        Wall-clock numbers go to ``pending["timing"]``, the rest is returned."""
        if not idx:
            return {"cases": 0, "voxels": 0, "runtime": None}
        cfg = self.config
        options = {"threshold": 0.0, "ignore_index": cfg.ignore_index, **cfg.relabel}
        summary = self.engine(pseudo_dir.parent / "grid_package", [self.unlabelled[i].image for i in idx], pseudo_dir,
                              options=options, resume=resumed, overwrite=not resumed, save_confidence=True,
                              progress=None)
        if summary["failed"]:
            raise ValueError(f"relabelling into {pseudo_dir} failed for {summary['failed']} cases: "
                             f"{summary['failures'][:3]}")
        log.info("relabelled %d cases into %s (%d done before): %.2f cases/s, runtime %s, busy %.0f%%",
                 summary["done"], pseudo_dir, summary["skipped"], summary["cases_per_s"], summary.get("runtime"),
                 100 * summary["busy_fraction"])
        for i in idx:
            self._index_pseudo(self.unlabelled[i], pseudo_dir)
        self.pending["timing"].update({"relabel_engine_s": summary["seconds"], "relabel_done": summary["done"],
                                       "relabel_skipped": summary["skipped"],
                                       "relabel_cases_per_s": summary["cases_per_s"],
                                       "relabel_busy_fraction": summary["busy_fraction"]})
        return {"cases": len(idx), "voxels": sum(self.unlabelled[i].voxels for i in idx),
                "runtime": summary.get("runtime")}

    def _index_pseudo(self, case: CachedCase, folder: Path) -> None:
        """``fg/<case>.npy`` (foreground of the thresholded pseudo label) and ``fg/<case>.json``."""
        cfg = self.config
        label = np.array(open_array(folder / f"{case.case_id}.npy"))
        if cfg.threshold != 0.0:
            label[low_confidence(label, open_array(folder / f"{case.case_id}_confidence.npy"), cfg.threshold)] = \
                cfg.ignore_index
        fg, counts = locate_foreground(label, cfg.num_classes)
        save_npy(folder / "fg" / f"{case.case_id}.npy", fg)
        atomic_write_bytes(folder / "fg" / f"{case.case_id}.json", json.dumps(counts).encode())

    # ------------------------------------------------------------------ monitors
    def _pseudo_stats(self, idx: list[int], k: int) -> dict[str, Any]:
        """As the memory path's monitors, streamed case by case from the label files: label change
        (all voxels; foreground since the last labels and since M0's), confidence, ignored share
        and, with known truth, the new labels' pooled Dice."""
        cfg = self.config
        acc = {"total": 0, "changed": 0, "fg": [0, 0], "fg0": [0, 0], "conf": 0.0, "ignored": 0}
        counts, has_old, has_m0, has_truth = 0, True, k > 0, True
        for i in idx:
            new_case = self._label_case(i, k)
            new, conf = open_array(new_case.label), open_array(new_case.confidence)
            acc["total"] += new.size
            acc["conf"] += float(conf.sum(dtype=np.float64))
            ignored = low_confidence(new, conf, cfg.threshold) | (new == cfg.ignore_index)
            acc["ignored"] += int(np.count_nonzero(ignored))
            old_round = self.label_round[i]
            has_old = has_old and old_round is not None
            if has_old:
                old = open_array(self._label_case(i).label)
                acc["changed"] += int(np.count_nonzero(old != new))
                _fg_change(acc["fg"], old, new, cfg.ignore_index)
            if has_m0:
                _fg_change(acc["fg0"], open_array(self._label_case(i, 0).label), new, cfg.ignore_index)
            truth = self.unlabelled[i].label
            has_truth = has_truth and truth is not None
            if has_truth:
                counts = counts + confusion_counts(np.asarray(new), open_array(truth), cfg.num_classes,
                                                   ignore_index=cfg.ignore_index)
        total = max(acc["total"], 1)
        stats = {"changed_fraction": acc["changed"] / total if has_old else math.nan,
                 "changed_fg": _ratio(acc["fg"]) if has_old else math.nan,
                 "changed_fg_m0": _ratio(acc["fg0"]) if has_m0 else math.nan,
                 "mean_confidence": acc["conf"] / (255.0 * total), "ignored_fraction": acc["ignored"] / total}
        if has_truth and idx:
            stats["pseudo_dice"] = _mean_fg(dice_from_counts(counts))
        return stats

    def _pseudo_dice_all(self) -> float:
        """Pooled Dice of the current pseudo labels of every case with truth (relabelling methods)."""
        if self.config.method not in ("atso", "self-training"):
            return math.nan
        cfg, counts, any_case = self.config, 0, False
        for i, case in enumerate(self.unlabelled):
            if case.label is None or self.label_round[i] is None:
                continue
            any_case = True
            counts = counts + confusion_counts(np.asarray(open_array(self._label_case(i).label)),
                                               open_array(case.label), cfg.num_classes, ignore_index=cfg.ignore_index)
        return _mean_fg(dice_from_counts(counts)) if any_case else math.nan

    def evaluate(self, cases: Sequence[CachedCase], package: Path | None = None) -> dict[str, Any]:  # type: ignore[override]
        """Dice of the model on cached labelled ``cases`` (pooled per class), one case in memory
        at a time: the live model through the engine's torch runtime, or with ``package`` (a
        round's ``grid_package``) the exported network through the engine's ``auto`` runtime."""
        if not cases:
            return {"dice": [], "mean_dice": math.nan}
        cfg = self.config
        relabel = default_relabel_fn(cfg) if package is None else _package_fn(package, cfg)
        was_training = self.model.training
        self.model.eval()
        counts, parts = 0, []
        try:
            for case in cases:
                labels = relabel(self.model, [np.asarray(open_array(case.image))])[0][0]
                truth = np.asarray(open_array(case.label))
                counts = counts + confusion_counts(labels, truth, cfg.num_classes, ignore_index=cfg.ignore_index)
                (pred, spacing), (truth, _) = as_case_maps(labels, cfg.spacing), as_case_maps(truth, cfg.spacing)
                parts.append(case_metrics([pred], [truth], cfg.num_classes, spacing=spacing,
                                          ignore_index=cfg.ignore_index))
        finally:
            self.model.train(was_training)
        per_class = dice_from_counts(counts)
        return {"dice": [float(v) for v in per_class], "mean_dice": _mean_fg(per_class),
                "cases": combine_case_metrics(parts, cfg.num_classes)}

    def validate(self, package: Path | None = None) -> dict[str, Any]:
        """Pooled Dice on the validation cases (see :meth:`evaluate`)."""
        result = self.evaluate(self.cache.cases["val"], package)
        out = {"val_dice": result["dice"], "val_mean_dice": result["mean_dice"]}
        if "cases" in result:
            out["val_cases"] = case_summary(result["cases"])
        return out

    def _finish_round(self, metrics: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        metrics.update(self.validate(self.round_dir(metrics["round"]) / "grid_package"))
        metrics["timing"]["validate_s"] = time.perf_counter() - start
        metrics["seconds"] = sum(metrics["timing"].get(key, 0.0) for key in
                                 ("train_s", "export_s", "relabel_s", "validate_s"))
        metrics = _nan_to_none(metrics)
        k = metrics["round"]
        self.history.append(metrics)
        self.round_index, self.pending, self._resumed_phase = k, {}, None
        self.phase = "done" if k >= self.config.rounds + int(self.config.consolidate) else "train"
        self.save_checkpoint()
        log.info("%s round %d: train loss %s, val mean Dice %s, %.1f s (train %.1f, export %.1f, relabel %.1f)",
                 self.config.method, k, metrics["train"]["loss"], metrics["val_mean_dice"], metrics["seconds"],
                 metrics["timing"].get("train_s", 0), metrics["timing"].get("export_s", 0),
                 metrics["timing"].get("relabel_s", 0))
        paths = {"package_path": str(self.out / metrics["package"]),
                 "pseudo_path": str(self.out / metrics["pseudo_dir"]) if metrics["pseudo_dir"] else None}
        for fn in self.callbacks:
            fn(self, {**metrics, **paths})
        return metrics

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Model, round and phase, lineages, where each pseudo label lives; mid-round also the
        optimiser state. Tensors and plain containers only (``weights_only`` safe); no data."""
        return {"format_version": _FORMAT, "round": self.round_index, "phase": self.phase, "method": self.config.method,
                "config": self.config.to_dict(), "subsets": {k: list(v) for k, v in self.subsets.items()},
                "case_ids": [c.case_id for c in self.unlabelled], "cache_spec_sha256": self.cache.spec_sha256,
                "model": _state_copy(self.model), "base_model": self.base_state, "init_model": self.init_state,
                "labelled_by": list(self.labelled_by), "label_round": list(self.label_round),
                "lineages": {k: dict(v) for k, v in self.lineages.items()},
                "pending": json.loads(json.dumps(_nan_to_none(self.pending))), "train_state": self.train_state,
                "history": json.loads(json.dumps(self.history))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of the same run (method, init, split, cases, cache spec).

        Raises:
            ValueError: a state of another format, method, data or preprocessing.
        """
        if state.get("format_version") != _FORMAT:
            raise ValueError(f"checkpoint format {state.get('format_version')!r} is not a disk-storage ATSO state "
                             f"({_FORMAT}); a memory-storage checkpoint resumes with storage='memory'")
        same = (state["method"], state["config"]["init"]) == (self.config.method, self.config.init)
        if not same or state["case_ids"] != [c.case_id for c in self.unlabelled] or state["subsets"] != self.subsets:
            raise ValueError(f"checkpoint of method {state['method']!r} (init {state['config']['init']!r}) on "
                             f"{len(state['case_ids'])} unlabelled cases cannot resume method {self.config.method!r} "
                             f"(init {self.config.init!r}) on {len(self.unlabelled)} cases with this split")
        if state["cache_spec_sha256"] != self.cache.spec_sha256:
            raise ValueError("checkpoint was trained on another preprocessing (normalisation, spacing or spec) "
                             "than this run's cache")
        if state["phase"] not in _PHASES:
            raise ValueError(f"checkpoint phase must be one of {_PHASES}, got {state['phase']!r}")
        self.model.load_state_dict(state["model"])
        self.base_state, self.init_state = state["base_model"], state["init_model"]
        self.round_index, self.phase = int(state["round"]), state["phase"]
        self.labelled_by, self.label_round = list(state["labelled_by"]), list(state["label_round"])
        self.lineages = {k: dict(v) for k, v in state["lineages"].items()}
        self.pending = dict(state["pending"])
        self.train_state = state["train_state"]
        self.history = [dict(h) for h in state["history"]]
        self._resumed_phase = self.phase


def _package_fn(package: Path, cfg: ATSOConfig) -> Callable[[Any, Sequence[np.ndarray]], list[tuple[np.ndarray]]]:
    """A ``relabel_fn`` running an exported package (``auto`` runtime); the model argument is unused."""
    engine = Relabeler(package, **{"runtime": "auto", **_relabeler_options(cfg.relabel), "threshold": 0.0,
                                   "ignore_index": cfg.ignore_index})

    def relabel(_model: Any, volumes: Sequence[np.ndarray]) -> list[tuple[np.ndarray]]:
        return [(engine.relabel_volume(v).labels,) for v in volumes]

    return relabel


_POOL_OPTIONS = ("address", "workers", "gpus_per_worker", "cpus_per_worker", "max_attempts")
"""``config.relabel`` keys a Ray archive engine takes for its pool, not the Relabeler."""


def _relabeler_options(options: dict[str, Any]) -> dict[str, Any]:
    """The :class:`Relabeler` arguments among ``options`` (a Ray engine's pool options left out;
    any other unknown key is an error, as on the Ray engine)."""
    return relabeler_options(options, ignore=_POOL_OPTIONS)


def _fg_change(acc: list[int], old: np.ndarray, new: np.ndarray, ignore_index: int) -> None:
    """Add one case's (changed, union) foreground counts (``monitor.foreground_change``)."""
    a, b = np.asarray(old), np.asarray(new)
    fg = ((a > 0) | (b > 0)) & (a != ignore_index) & (b != ignore_index)
    acc[0] += int(np.count_nonzero(fg & (a != b)))
    acc[1] += int(np.count_nonzero(fg))


def _ratio(acc: list[int]) -> float:
    return acc[0] / acc[1] if acc[1] else math.nan


def _mean_fg(per_class: np.ndarray) -> float:
    fg = np.asarray(per_class)[1:]
    fg = fg[~np.isnan(fg)]
    return float(fg.mean()) if fg.size else math.nan


def _grid_package(package: Path, folder: Path) -> Path:
    """The network of ``package`` for volumes already on its grid: no orientation, crop,
    resampling or normalisation (the cache did them); the ONNX file is hard-linked (copied
    where links fail)."""
    meta = json.loads((package / "model.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / meta["onnx_file"]
    tmp = folder / f".{meta['onnx_file']}.link.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(package / meta["onnx_file"], tmp)
    except OSError:
        shutil.copyfile(package / meta["onnx_file"], tmp)
    os.replace(tmp, target)
    spec = default_preprocessing()
    spec["grid"] = meta["preprocessing"]["grid"]
    meta.update(normalization={"scheme": "none"}, spacing=None, preprocessing=spec, torch_file=None)
    meta.pop("torch_sha256", None)
    atomic_write_bytes(folder / "model.json", (json.dumps(meta, indent=2) + "\n").encode())
    return folder


register_storage("disk", ArchiveATSO)
