"""ATSO vs self-training vs supervised on synthetic CT-like phantoms, several seeds and label fractions.

For every (labelled fraction, seed) the three methods start from one shared supervised warm-up
(same M0, same pseudo labels, same split), so their differences are paired. Reported: final
validation Dice (mean +- std over seeds, per class and foreground mean), the paired difference
ATSO - self-training, and the lazy-learning monitor per round (loss of the model on the pseudo
labels it is about to learn, fraction of pseudo-label voxels that changed at relabelling, mean
confidence, pseudo-label Dice against the phantoms' hidden truth).

Default setting (CPU budget, about 10-15 minutes on 2 cores): 2D phantoms (slices through 3D
phantoms, 64 x 64), 100 training slices (10% / 25% labelled), 40 validation slices, 2D U-Net
8-16-32-64, warm-up 400 steps, 4 rounds x 100 steps. ``--dims 3`` uses 3D phantoms (16 x 32 x 32).
``--ablation`` adds ATSO variants (confidence threshold, init from M0, decaying round lr, more
labelled samples per batch).

Usage: python benchmarks/exp_atso_synthetic.py [--seeds 0 1 2] [--fractions 0.1 0.25] [--dims 2|3]
       [--ablation] [--quick] [--threads N] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atso_fast.datasets.synthetic import (
    make_phantoms,
    phantom_class_names,
    phantom_num_classes,
)
from atso_fast.train.atso import ATSO, ATSOConfig, run_methods
from atso_fast.train.data import data_from_arrays

__all__ = ["main", "SETTINGS", "ABLATIONS", "METHODS", "summarise_run", "run_all", "markdown", "stats",
           "monitor_table", "machine_meta"]

SETTINGS: dict[int, dict[str, Any]] = {
    2: {"shape": (64, 64), "n_train": 100, "n_val": 40, "batch_size": 8, "model": {"base_channels": 8, "depth": 4},
        "warmup_steps": 400, "rounds": 4, "steps_per_round": 100, "lr": 3e-3, "round_lr": 1e-3},
    3: {"shape": (16, 32, 32), "n_train": 20, "n_val": 8, "batch_size": 2, "model": {"base_channels": 8, "depth": 3},
        "warmup_steps": 500, "rounds": 4, "steps_per_round": 100, "lr": 1e-2, "round_lr": 3e-3},
}
QUICK = {"n_train": 20, "n_val": 6, "warmup_steps": 20, "rounds": 2, "steps_per_round": 5}
ABLATIONS: dict[str, dict[str, Any]] = {
    "atso threshold 0.9": {"threshold": 0.9},
    "atso init=base": {"init": "base"},
    "atso lr decay 0.5": {"round_lr_decay": 0.5},
    "atso labelled ratio 0.75": {"labelled_ratio": 0.75},
}
METHODS = ("supervised", "self-training", "atso")


def make_data(setting: dict[str, Any], fraction: float, seed: int):
    """Phantoms of ``seed``: the first ``round(fraction * n_train)`` labelled, the rest unlabelled
    (their truth kept only for the pseudo-label monitor), then ``n_val`` validation cases."""
    n, n_val = setting["n_train"], setting["n_val"]
    kwargs = {"target_radius": (0.14, 0.22)} if len(setting["shape"]) == 3 else {}
    ph = make_phantoms(n + n_val, setting["shape"], seed=seed, **kwargs)
    n_lab = max(1, round(fraction * n))
    return data_from_arrays(ph[:n_lab], ph[n_lab:n], ph[n:], normalization="ct")


def make_config(setting: dict[str, Any], seed: int) -> ATSOConfig:
    keys = ("batch_size", "model", "warmup_steps", "rounds", "steps_per_round", "lr", "round_lr")
    return ATSOConfig(num_classes=phantom_num_classes(), spatial_dims=len(setting["shape"]),
                      patch_size=setting["shape"], seed=seed, **{k: setting[k] for k in keys})


def summarise_run(run: ATSO) -> dict[str, Any]:
    """Final Dice, per-round monitor and timings of one finished run."""
    rounds = []
    for h in run.history:
        mon = list(h["monitor"].values())
        pick = lambda key: [m[key] for m in mon if m.get(key) is not None]  # noqa: E731
        rounds.append({"round": h["round"], "val_mean_dice": h["val_mean_dice"],
                       "pre_loss": _mean(pick("pre_loss")), "changed_fraction": _mean(pick("changed_fraction")),
                       "mean_confidence": _mean(pick("mean_confidence")), "pseudo_dice": _mean(pick("pseudo_dice")),
                       "trained_on": h["trained_on"], "relabelled": h["relabelled"]})
    last = run.history[-1]
    return {"val_mean_dice": last["val_mean_dice"], "val_dice": last["val_dice"], "rounds": rounds,
            "seconds": sum(h["seconds"] for h in run.history[1:])}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def run_setting(setting: dict[str, Any], fraction: float, seed: int, ablation: bool) -> dict[str, Any]:
    """All methods (and ablations) of one (fraction, seed) from one shared warm-up."""
    data = make_data(setting, fraction, seed)
    plans = {m: {"method": m} for m in METHODS}
    if ablation:
        plans.update({name: {"method": "atso", **change} for name, change in ABLATIONS.items()})
    start = time.perf_counter()
    runs = run_methods(make_config(setting, seed), plans, data=data)
    out: dict[str, Any] = {name: summarise_run(run) for name, run in runs.items()}
    out["warmup"] = runs["atso"].history[0]["val_mean_dice"]
    out["seconds"] = time.perf_counter() - start
    return out


def stats(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} +- {sd:.3f}"


def markdown(results: dict[str, Any], meta: dict[str, Any], class_names: list[str], title: str) -> str:
    """Dice table, paired differences and lazy-learning monitor, as markdown.

    Args:
        results: ``{setting: [per-seed dict of run name -> summarise_run(...), "warmup": Dice]}``.
        meta: machine, torch, threads, date, seeds, seconds.
        class_names: foreground class names (Dice columns).
        title: first heading.
    """
    names = class_names
    lines = [f"# {title}", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} thread(s); {meta['date']}; "
             f"seeds {meta['seeds']}; total {meta['seconds'] / 60:.1f} min.", "",
             "| labelled | method | val mean Dice | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for frac, per_seed in results.items():
        methods = [k for k in per_seed[0] if isinstance(per_seed[0][k], dict)]
        lines.append(f"| {frac} | warm-up M0 | {stats([r['warmup'] for r in per_seed])} |" + " |" * len(names))
        for m in methods:
            cls = [stats([r[m]["val_dice"][c + 1] for r in per_seed]) for c in range(len(names))]
            mean = stats([r[m]["val_mean_dice"] for r in per_seed])
            lines.append(f"| {frac} | {m} | {mean} | " + " | ".join(cls) + " |")
    lines += ["", "Paired differences (same seed, same warm-up), mean +- std over seeds:", ""]
    for frac, per_seed in results.items():
        variants = [k for k in per_seed[0] if isinstance(per_seed[0][k], dict) and k not in METHODS]
        pairs = [("atso", "self-training"), ("atso", "supervised"), ("self-training", "supervised")]
        for a, b in pairs + [(v, ref) for v in variants for ref in ("atso", "self-training")]:
            diff = [r[a]["val_mean_dice"] - r[b]["val_mean_dice"] for r in per_seed]
            wins = sum(d > 0 for d in diff)
            lines.append(f"- {frac}: {a} - {b} = {stats(diff)} ({wins}/{len(diff)} seeds > 0)")
    lines += ["", monitor_table(results)]
    return "\n".join(lines) + "\n"


def monitor_table(results: dict[str, Any]) -> str:
    lines = ["Lazy-learning monitor (mean over seeds): pre-loss = loss of the model entering the round on "
             "the pseudo labels it then trains on; changed = fraction of relabelled voxels that changed; "
             "pseudo Dice = relabelled subset vs hidden truth.", "",
             "| labelled | method | round | pre-loss | changed | confidence | pseudo Dice | val Dice |",
             "|---|---|---|---|---|---|---|---|"]
    for frac, per_seed in results.items():
        for m in ("self-training", "atso"):
            for k in range(1, len(per_seed[0][m]["rounds"])):
                rows = [r[m]["rounds"][k] for r in per_seed]
                cells = [stats([x[key] for x in rows]) for key in
                         ("pre_loss", "changed_fraction", "mean_confidence", "pseudo_dice", "val_mean_dice")]
                lines.append(f"| {frac} | {m} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_all(setting: dict[str, Any], fractions: list[float], seeds: list[int], ablation: bool
            ) -> dict[str, list[dict[str, Any]]]:
    """Every (fraction, seed); progress lines on stderr."""
    results: dict[str, list[dict[str, Any]]] = {}
    for frac in fractions:
        key = f"{round(100 * frac)}%"
        for seed in seeds:
            res = run_setting(setting, frac, seed, ablation)
            results.setdefault(key, []).append(res)
            print(f"{key} seed {seed}: " + ", ".join(f"{m} {res[m]['val_mean_dice']:.3f}" for m in METHODS)
                  + f" ({res['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return results


def machine_meta(threads: int, seconds: float, seeds: list[int]) -> dict[str, Any]:
    """Machine, versions, threads, date: recorded with every result."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"machine": f"{platform.processor() or platform.machine()}, {cores} cores, CPU only",
            "torch": torch.__version__, "threads": threads, "date": time.strftime("%Y-%m-%d"),
            "seeds": seeds, "seconds": seconds}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25])
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--ablation", action="store_true", help="also run ATSO variants (see ABLATIONS)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the recorded results used 1; the count changes results)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown")
    parser.add_argument("--report", help="only re-render the markdown of a saved JSON result")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print(markdown(saved["results"], saved["meta"], phantom_class_names()[1:],
                       f"ATSO on synthetic phantoms ({saved['meta']['dims']}D)"))
        return 0
    setting = {**SETTINGS[args.dims], **(QUICK if args.quick else {})}
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads or before)
    start = time.perf_counter()
    try:
        results = run_all(setting, args.fractions, args.seeds, args.ablation)
    finally:
        torch.set_num_threads(before)
    meta = {**machine_meta(args.threads or before, time.perf_counter() - start, args.seeds), "dims": args.dims,
            "setting": {**setting, "shape": list(setting["shape"])}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"atso_synthetic_{args.dims}d" + ("_ablation" if args.ablation else "") + ("_quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    text = markdown(results, meta, phantom_class_names()[1:], f"ATSO on synthetic phantoms ({args.dims}D)")
    (out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
