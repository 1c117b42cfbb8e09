"""The shared protocol of the ATSO experiments (phantoms and real scans): arms, seeds, endpoint,
statistics, monitors, tables and charts.

Protocol (fixed before any run):
- Per seed, one data split (labelled L, unlabelled U with its truth hidden from training,
  validation, test) and one supervised warm-up M0; every arm starts from that M0 and its pseudo
  labels (paired design). Each seed is reproducible from its seed alone.
- Validation cases choose the warm-up length and settings (pilot seeds not used for results);
  test cases are scored once, at the end of the last round.
- Primary endpoint: final-round test Dice, per class pooled over all test cases (every voxel
  weighs the same), averaged over the foreground classes.
- Contrasts: paired differences over seeds with 95% t confidence intervals and Wilcoxon
  signed-rank p-values, Holm-corrected over the family of contrasts named by the experiment.
- Monitors per round (lazy learning): the student's hard-Dice agreement with its targets before
  it trains, its loss on the pseudo-labelled half of its batches, the foreground-only label change
  since the last labels and since M0's, and the pseudo labels' Dice against the hidden truth.

Seeds run in ``workers`` single-thread processes (``spawn``); each finished seed is written to
``work/seed_<s>.json`` so an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atso_fast.train.atso import ATSO, ATSOConfig, default_relabel_fn, run_methods
from atso_fast.train.data import Case, SemiSupervisedData
from atso_fast.train.metrics import case_summary
from atso_fast.train.monitor import pooled_dice
from atso_fast.train.report import contrast_table

__all__ = [
    "ARMS",
    "MONITORS",
    "run_seed",
    "run_seeds",
    "summarise",
    "markdown",
    "charts",
    "machine_meta",
    "final_values",
    "cpu_seconds",
    "warmup_sweep",
    "choose_warmup",
]

# name -> ATSOConfig overrides (all from the shared warm-up)
ARMS: dict[str, dict[str, Any]] = {
    "supervised": {"method": "supervised"},
    "self-training": {"method": "self-training"},
    "atso": {"method": "atso", "init": "continue"},
    "atso-m0": {"method": "atso", "init": "m0"},
    "oracle": {"method": "oracle"},
}
# monitor key -> (plain label, where it lives)
MONITORS: dict[str, str] = {
    "val_mean_dice": "validation Dice (pooled, fg mean)",
    "start_agreement": "student vs its targets before training (hard Dice)",
    "pseudo_loss": "loss on the pseudo-labelled half (mean over the round)",
    "changed_fg": "foreground label change since the last labels",
    "changed_fg_m0": "foreground label change since M0's labels",
    "pseudo_dice": "relabelled pseudo labels vs hidden truth (Dice)",
    "pseudo_dice_all": "all current pseudo labels vs hidden truth (Dice)",
}


def _round_row(h: dict[str, Any]) -> dict[str, Any]:
    relabelled = [h["monitor"][n] for n in h.get("relabelled", []) if n in h["monitor"]]

    def pick(key: str) -> float | None:
        vals = [m[key] for m in relabelled if m.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    student = h.get("student", {})
    return {
        "round": h["round"],
        "val_mean_dice": h["val_mean_dice"],
        "student_from": h.get("student_from"),
        "trained_on": h["trained_on"],
        "relabelled": h["relabelled"],
        "start_agreement": student.get("start_agreement"),
        "pseudo_loss": student.get("pseudo_loss"),
        "pseudo_first_loss": student.get("pseudo_first_loss"),
        "pseudo_last_loss": student.get("pseudo_last_loss"),
        "pre_loss": student.get("pre_loss"),
        "changed_fg": pick("changed_fg"),
        "changed_fg_m0": pick("changed_fg_m0"),
        "changed_fraction": pick("changed_fraction"),
        "pseudo_dice": pick("pseudo_dice"),
        "pseudo_dice_all": h.get("pseudo_dice_all"),
        "train_loss": h["train"]["loss"],
        "seconds": h["seconds"],
        "stage": h.get("stage"),
        **{f"premise_{k}": v for k, v in (h.get("premise") or {}).items()},
    }


def summarise_run(run: ATSO, test: Sequence[Case]) -> dict[str, Any]:
    """Final test and validation Dice, per-round monitors and seconds of one finished run."""
    result = run.evaluate(test)
    last = run.history[-1]
    cfg, cases = run.config, result["cases"]
    store = run.store
    truth = [(p, c.label) for p, c in zip(store.pseudo, store.data.unlabelled) if p is not None and c.label is not None]
    pseudo = (
        pooled_dice([p for p, _ in truth], [t for _, t in truth], cfg.num_classes, ignore_index=cfg.ignore_index)
        if cfg.method in ("atso", "self-training") and truth
        else None
    )
    return {
        "test_mean_dice": result["mean_dice"],
        "test_dice": result["dice"],
        "test_case_dice": cases["mean_dice"],
        "test_case_dice_sd": cases["mean_dice_sd"],
        "test_case": case_summary(cases),
        "pseudo_dice_final": None if pseudo is None else pseudo[0],
        "pseudo_mean_dice_final": None if pseudo is None else pseudo[1],
        "val_mean_dice": last["val_mean_dice"],
        "val_dice": last["val_dice"],
        "rounds": [_round_row(h) for h in run.history],
        "seconds": sum(h["seconds"] for h in run.history[1:]),
    }


def run_seed(
    config: ATSOConfig, data: SemiSupervisedData, test: Sequence[Case], arms: Mapping[str, dict[str, Any]]
) -> dict[str, Any]:
    """Every arm of one seed from one shared warm-up; test Dice of M0 too."""
    start, cpu = time.perf_counter(), time.process_time()
    relabel = default_relabel_fn(config, probabilities=any(a.get("targets") == "soft" for a in arms.values()))
    m0: dict[str, Any] = {}

    def keep_m0(run: ATSO, metrics: dict[str, Any]) -> None:
        if metrics["round"] == 0 and not m0:
            result = run.evaluate(test)
            m0.update(result, val_mean_dice=metrics["val_mean_dice"], test_case_dice=result["cases"]["mean_dice"])

    runs = run_methods(config, dict(arms), data=data, relabeler=relabel, callbacks=[keep_m0])
    out: dict[str, Any] = {"arms": {name: summarise_run(run, test) for name, run in runs.items()}}
    out["m0"] = {
        "test_mean_dice": m0.get("mean_dice"),
        "test_dice": m0.get("dice"),
        "val_mean_dice": m0.get("val_mean_dice"),
        "test_case_dice": m0.get("test_case_dice"),
    }
    out["warmup_seconds"] = next(iter(runs.values())).history[0]["seconds"]
    out["seconds"] = time.perf_counter() - start
    out["cpu_seconds"] = time.process_time() - cpu
    return out


def warmup_sweep(config: ATSOConfig, data: SemiSupervisedData, grid: Sequence[int]) -> dict[str, Any]:
    """Validation Dice of M0 for each warm-up length in ``grid`` (a fresh model each, its own
    learning-rate schedule), as ``{"warmup": {steps: Dice}, "seconds", "cpu_seconds", "arms": {}}``."""
    start, cpu = time.perf_counter(), time.process_time()
    out: dict[str, Any] = {"warmup": {}}
    for steps in grid:
        cfg = ATSOConfig.from_dict(
            {**config.to_dict(), "warmup_steps": int(steps), "rounds": 0, "method": "supervised"}
        )
        run = ATSO(cfg, relabeler=default_relabel_fn(cfg), data=data)
        run.warmup()
        out["warmup"][str(steps)] = run.history[0]["val_mean_dice"]
    out["seconds"], out["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
    out["arms"] = {}
    return out


def choose_warmup(pilot: Mapping[int, dict[str, Any]], tolerance: float = 0.005) -> tuple[int, dict[int, float]]:
    """Shortest warm-up whose mean validation Dice over pilot seeds is within ``tolerance`` of the best."""
    grid = sorted(int(k) for k in next(iter(pilot.values()))["warmup"])
    means = {s: statistics.fmean(r["warmup"][str(s)] for r in pilot.values()) for s in grid}
    best = max(means.values())
    return next(s for s in grid if means[s] >= best - tolerance), means


def _worker(task: tuple[Callable[[int], dict[str, Any]], int, str]) -> tuple[int, dict[str, Any]]:
    fn, seed, path = task
    torch.set_num_threads(1)
    result = fn(seed)
    result["seed"] = seed
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return seed, result


def run_seeds(
    fn: Callable[[int], dict[str, Any]],
    seeds: Sequence[int],
    work: Path,
    *,
    workers: int = 2,
    log: Callable[[str], None] = print,
) -> dict[int, dict[str, Any]]:
    """``fn(seed)`` for every seed in ``workers`` single-thread processes, cached in ``work``.

    ``fn`` must be a module-level function (it is pickled into ``spawn`` workers).
    """
    work.mkdir(parents=True, exist_ok=True)
    done: dict[int, dict[str, Any]] = {}
    todo = []
    for seed in seeds:
        path = work / f"seed_{seed}.json"
        if path.is_file():
            done[seed] = json.loads(path.read_text())
        else:
            todo.append((fn, seed, str(path)))
    if todo:
        if workers <= 1:
            results = map(_worker, todo)
            pool = None
        else:
            pool = multiprocessing.get_context("spawn").Pool(min(workers, len(todo)))
            results = pool.imap_unordered(_worker, todo)
        try:
            for seed, result in results:
                done[seed] = result
                log(
                    f"seed {seed} done in {result['seconds']:.0f} s (cpu {result['cpu_seconds']:.0f} s): "
                    + ", ".join(f"{a} {v['test_mean_dice']:.3f}" for a, v in result["arms"].items())
                )
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    return {s: done[s] for s in seeds}


def final_values(results: Mapping[int, dict[str, Any]], key: str = "test_mean_dice") -> dict[str, list[float]]:
    """Arm -> per-seed value of ``key`` (seed order of ``results``)."""
    arms = next(iter(results.values()))["arms"]
    return {a: [float(r["arms"][a][key]) for r in results.values()] for a in arms}


def cpu_seconds(results: Mapping[int, dict[str, Any]]) -> float:
    return float(sum(r["cpu_seconds"] for r in results.values()))


def _ms(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "-"
    return f"{statistics.fmean(vals):.3f} +- {statistics.stdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def summarise(results: Mapping[int, dict[str, Any]], contrasts: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Per-arm means and the contrast table on the primary endpoint (and on validation)."""
    test, val = final_values(results), final_values(results, "val_mean_dice")
    arms = list(test)
    pairs = [(a, b) for a, b in contrasts if a in test and b in test]
    return {
        "arms": {a: {"test_mean": statistics.fmean(test[a]), "val_mean": statistics.fmean(val[a])} for a in arms},
        "m0": {"test_mean": statistics.fmean([r["m0"]["test_mean_dice"] for r in results.values()])},
        "contrasts": contrast_table(test, pairs),
        "val_contrasts": contrast_table(val, pairs),
    }


def _fmt_p(p: float | None) -> str:
    return "-" if p is None or not math.isfinite(p) else (f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}")


def contrast_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| contrast | mean difference | 95% CI (t) | Wilcoxon p | Holm p | seeds a > b |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['a']} - {r['b']} | {r['mean']:+.4f} | {r['ci_low']:+.4f} to {r['ci_high']:+.4f} | "
            f"{_fmt_p(r['p_wilcoxon'])} | {_fmt_p(r['p_holm'])} | {r['wins']}/{r['n']} |"
        )
    return lines


def markdown(
    results: Mapping[int, dict[str, Any]],
    meta: Mapping[str, Any],
    class_names: Sequence[str],
    contrasts: Sequence[tuple[str, str]],
    title: str,
    notes: Sequence[str] = (),
) -> str:
    """Tables: final test Dice per arm and class, paired contrasts, monitors per round."""
    summary = summarise(results, contrasts)
    rows = list(results.values())
    arms = list(rows[0]["arms"])
    lines = [
        f"# {title}",
        "",
        *notes,
        "" if notes else "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, 1 thread per process, {meta['workers']} processes; "
        f"{meta['date']}; load average {meta['load_before']} -> {meta['load_after']}; seeds {list(results)}; "
        f"wall {meta['seconds'] / 60:.1f} min, {meta['cpu_seconds'] / 60:.1f} CPU-min "
        f"({meta['cpu_seconds'] / 60 / max(1, meta['workers']):.1f} min per process if idle).",
        "",
        "## Primary endpoint: final-round test Dice (pooled per class over the test cases, foreground mean)",
        "",
        "| arm | test mean Dice | " + " | ".join(class_names) + " | val mean Dice |",
        "|---|---|" + "---|" * len(class_names) + "---|",
    ]
    lines.append(
        "| warm-up M0 | "
        + _ms([r["m0"]["test_mean_dice"] for r in rows])
        + " | "
        + " | ".join(_ms([r["m0"]["test_dice"][c + 1] for r in rows]) for c in range(len(class_names)))
        + " | "
        + _ms([r["m0"]["val_mean_dice"] for r in rows])
        + " |"
    )
    for a in arms:
        per = [_ms([r["arms"][a]["test_dice"][c + 1] for r in rows]) for c in range(len(class_names))]
        lines.append(
            f"| {a} | {_ms([r['arms'][a]['test_mean_dice'] for r in rows])} | "
            + " | ".join(per)
            + f" | {_ms([r['arms'][a]['val_mean_dice'] for r in rows])} |"
        )
    lines += ["", "Mean +- SD over seeds.", "", "## Paired contrasts (test, final round; Holm over this table)", ""]
    lines += contrast_lines(summary["contrasts"])
    lines += ["", "Same contrasts on the validation cases (the set used for choices):", ""]
    lines += contrast_lines(summary["val_contrasts"])
    lines += ["", monitor_table(results)]
    return "\n".join(lines) + "\n"


def monitor_table(results: Mapping[int, dict[str, Any]]) -> str:
    keys = (
        "val_mean_dice",
        "start_agreement",
        "pseudo_loss",
        "changed_fg",
        "changed_fg_m0",
        "pseudo_dice",
        "pseudo_dice_all",
    )
    lines = [
        "## Monitors per round (mean over seeds)",
        "",
        "start agreement = hard Dice of the student, as it starts the round, against the targets it is about "
        "to train on (1.0 = it already reproduces them: nothing to learn); pseudo loss = its loss on the "
        "pseudo-labelled half of its batches; fg change = share of the voxels labelled foreground before or "
        "after that changed label (since the previous labels of the same cases / since M0's labels: equal "
        "age); pseudo Dice = the labels relabelled this round / all current labels of U against the hidden "
        "truth.",
        "",
        "| arm | round | student from | val Dice | start agreement | pseudo loss | fg change | fg change since M0 "
        "| pseudo Dice (relabelled) | pseudo Dice (all U) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = list(results.values())
    for a in rows[0]["arms"]:
        for k in range(len(rows[0]["arms"][a]["rounds"])):
            cells = [_mean_only([r["arms"][a]["rounds"][k][key] for r in rows]) for key in keys]
            start = rows[0]["arms"][a]["rounds"][k]["student_from"] or "-"
            lines.append(f"| {a} | {k} | {start} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_only(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return f"{statistics.fmean(vals):.3f}" if vals else "-"


def charts(results: Mapping[int, dict[str, Any]], path: Path, title: str) -> Path:
    """One PNG, one panel per monitor, one line per arm (mean over seeds, +- 1 standard error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(results.values())
    keys = list(MONITORS)
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    colours = plt.get_cmap("tab20").colors
    for ax, key in zip(axes.ravel(), keys):
        for i, a in enumerate(rows[0]["arms"]):
            n_rounds = len(rows[0]["arms"][a]["rounds"])
            xs, ms, ses = [], [], []
            for k in range(n_rounds):
                vals = [r["arms"][a]["rounds"][k][key] for r in rows]
                vals = [v for v in vals if v is not None and math.isfinite(v)]
                if vals:
                    xs.append(k)
                    ms.append(statistics.fmean(vals))
                    ses.append(statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else 0.0)
            if xs:
                colour = colours[(2 * i) % 20 + (2 * i) // 20]
                ax.plot(xs, ms, marker="o", label=a, color=colour, linestyle="-" if i < 5 else "--")
                ax.fill_between(xs, np.subtract(ms, ses), np.add(ms, ses), alpha=0.12, color=colour)
        ax.set_title(MONITORS[key], fontsize=9)
        ax.set_xlabel("round (0 = warm-up M0)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes.ravel()[-1].axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    axes.ravel()[-1].legend(handles, labels, loc="center")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def machine_meta(workers: int) -> dict[str, Any]:
    """Machine (``lscpu | head``), versions, date and load, recorded with every result."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()[:14]
    except (OSError, subprocess.SubprocessError):
        lscpu = []
    model = next(
        (line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")),
        platform.processor() or platform.machine(),
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {
        "machine": f"{model}, {cores} cores, CPU only",
        "lscpu": lscpu,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "workers": workers,
        "date": time.strftime("%Y-%m-%d"),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
