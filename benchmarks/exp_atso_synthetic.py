"""ATSO vs self-training vs supervised vs oracle on CT-like synthetic phantoms: a paired, powered
experiment with a pilot for the warm-up length and a headroom check (protocol:
``exp_atso_protocol.py``).

Task (``--task``): 2D phantoms (slices through 3D phantoms, 64 x 64; liver, kidney, spleen and a
small low-contrast target in the liver), per seed ``n_labelled`` labelled, ``n_unlabelled``
unlabelled (truth hidden from training; used by the oracle arm and the monitors), ``n_val``
validation and ``n_test`` test slices, all drawn from that seed. ``hard`` has more noise, a fainter
and smaller target and fewer labels (the headroom rule: if the oracle gains < 0.02 Dice over
supervised on validation, the task is made harder).

Stages:
    ``--pilot``   warm-up length sweep on pilot seeds (validation only): M0 trained for each length in
                  ``--grid``; the chosen length is the shortest within 0.005 of the best mean.
                  Then every arm once per pilot seed from that M0, on validation (headroom).
    (default)     the main experiment on ``--seeds``; writes JSON, markdown and one PNG of monitors.
    ``--record``  also writes ``atso_fast/train/recorded.py`` (the demo's reference);
                  ``--record-from JSON`` records a finished experiment without running it.

Usage: python benchmarks/exp_atso_synthetic.py [--task 2d|hard] [--pilot] [--seeds 0 ... 9]
       [--arms main|variants|lineage|lineage-all|lines|baselines|all] [--extra-arms atso-lineage ...] [--set rounds=8]
       [--workers 2] [--out benchmarks/results] [--record]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pprint
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exp_atso_protocol import (  # noqa: E402
    ARMS,
    charts,
    choose_warmup,
    cpu_seconds,
    machine_meta,
    markdown,
    monitor_table,
    run_seed,
    run_seeds,
    summarise,
    warmup_sweep,
)

from atso_fast.datasets.synthetic import (  # noqa: E402
    make_phantoms,
    phantom_class_names,
    phantom_num_classes,
)
from atso_fast.train.atso import ATSOConfig  # noqa: E402
from atso_fast.train.data import data_from_arrays  # noqa: E402
from atso_fast.train.recorded import RECORDED  # noqa: E402

RECORDED_NOW: dict[str, Any] = dict(RECORDED or {})

__all__ = [
    "TASKS",
    "VARIANTS",
    "LINEAGE_VARIANTS",
    "CONTRASTS",
    "contrasts_for",
    "chosen_on_validation",
    "record_experiment",
    "write_record",
    "split_extra_arms",
    "partial_lines",
    "pilot_verdict",
    "main",
    "make_task",
    "make_config",
    "seed_task",
    "pilot_task",
]

_BASE = {
    "shape": (64, 64),
    "n_labelled": 10,
    "n_unlabelled": 90,
    "n_val": 50,
    "n_test": 100,
    "phantom": {},
    "config": {
        "batch_size": 8,
        "model": {"base_channels": 8, "depth": 4},
        "warmup_steps": 1000,
        "rounds": 4,
        "steps_per_round": 200,
        "lr": 3e-3,
        "round_lr": 1e-3,
    },
}
TASKS: dict[str, dict[str, Any]] = {
    "2d": _BASE,
    "hard": {
        **_BASE,
        "n_labelled": 6,
        "n_unlabelled": 94,
        "phantom": {"noise_hu": 35.0, "target_radius": (0.05, 0.09)},
    },
    # the demo's setting (atso_fast.train.cli.DEMO_SETTINGS["full"]), plus 20 test volumes
    "demo3d": {
        "shape": (16, 32, 32),
        "n_labelled": 4,
        "n_unlabelled": 20,
        "n_val": 6,
        "n_test": 20,
        "phantom": {"target_radius": (0.14, 0.22)},
        "config": {
            "batch_size": 2,
            "model": {"base_channels": 8, "depth": 3},
            "warmup_steps": 400,
            "rounds": 2,
            "steps_per_round": 80,
            "lr": 1e-2,
            "round_lr": 3e-3,
        },
    },
}
QUICK = {
    "n_labelled": 4,
    "n_unlabelled": 8,
    "n_val": 4,
    "n_test": 4,
    "config": {"warmup_steps": 10, "rounds": 2, "steps_per_round": 4},
}
# ATSO variants that keep the student from being its own teacher (all from the shared warm-up)
VARIANTS: dict[str, dict[str, Any]] = {
    "self-training-m0": {"method": "self-training", "init": "m0"},
    "atso-lineage": {"method": "atso", "init": "lineage"},
    "atso-m0-soft": {"method": "atso", "init": "m0", "targets": "soft"},
    "atso-m0-t0.9": {"method": "atso", "init": "m0", "threshold": 0.9},
    "atso-m0-k4": {"method": "atso", "init": "m0", "num_subsets": 4},
    "atso-m0-long": {"method": "atso", "init": "m0", "rounds": 2, "steps_per_round": 400},
}
# The variants experiment (``--arms lineage``): the paper's procedure as implemented (``atso``) and
# the two-lineage reading (no model ever trains on labels it made: the best init on the pilot's
# validation cases, 0.799 vs 0.789 for ``atso`` and 0.788 for ``atso-m0``), then one factor at a
# time on top of two lineages: K = 3 parts, soft targets, a confidence threshold (0.9, the pilot's
# value), longer rounds (2 x 400 steps: the same 800 fine-tuning steps as 4 x 200).
LINEAGE_VARIANTS: dict[str, dict[str, Any]] = {
    "atso-lineage": {"method": "atso", "init": "lineage"},
    "atso-lineage-k3": {"method": "atso", "init": "lineage", "num_subsets": 3},
    "atso-lineage-soft": {"method": "atso", "init": "lineage", "targets": "soft"},
    "atso-lineage-t0.9": {"method": "atso", "init": "lineage", "threshold": 0.9},
    "atso-lineage-long": {"method": "atso", "init": "lineage", "rounds": 2, "steps_per_round": 400},
}
CONTRASTS = [
    ("atso", "self-training"),
    ("atso", "supervised"),
    ("atso-m0", "self-training"),
    ("atso-m0", "supervised"),
    ("self-training", "supervised"),
    ("oracle", "supervised"),
]


def contrasts_for(arms: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """Every ATSO arm against self-training and against supervised, then self-training and the
    oracle against supervised (the main arms give :data:`CONTRASTS`, in that order)."""
    out = [(a, b) for a in arms if a.startswith("atso") for b in ("self-training", "supervised") if b in arms]
    return out + [(a, "supervised") for a in ("self-training", "oracle") if a in arms and "supervised" in arms]


def chosen_on_validation(summary: dict[str, Any]) -> list[str]:
    """The ATSO arm with the best mean validation Dice (the only set used for choices) and its
    test contrasts: the headline of an experiment with several ATSO arms."""
    atso = {a: v["val_mean"] for a, v in summary["arms"].items() if a.startswith("atso")}
    if len(atso) < 2:
        return []
    best = max(atso, key=atso.get)
    rows = [c for c in summary["contrasts"] if c["a"] == best]
    text = "; ".join(
        f"{best} - {c['b']} {c['mean']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}], Holm p {c['p_holm']:.3f}"
        for c in rows
    )
    return [
        f"ATSO arm chosen on validation (best mean validation Dice, {atso[best]:.4f}): **{best}**; "
        f"its test contrasts: {text}."
    ]


def split_extra_arms(results: dict[int, dict[str, Any]], arms: dict[str, dict[str, Any]]):
    """Keep only ``arms`` in every seed; arms that cached seeds hold beyond those (an experiment
    narrowed part-way) come back apart as ``{arm: {seed: {"test", "val", "test_self_training",
    "val_self_training"}}}``, to be reported as run on those seeds only."""
    partial: dict[str, dict[str, dict[str, float]]] = {}
    kept = {}
    for seed, r in results.items():
        for a, v in r["arms"].items():
            if a not in arms and "self-training" in r["arms"]:
                st = r["arms"]["self-training"]
                partial.setdefault(a, {})[str(seed)] = {
                    "test": v["test_mean_dice"],
                    "val": v["val_mean_dice"],
                    "test_self_training": st["test_mean_dice"],
                    "val_self_training": st["val_mean_dice"],
                }
        kept[seed] = {**r, "arms": {a: r["arms"][a] for a in arms}}
    return kept, partial


def partial_lines(partial: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Plain lines for arms run on only some seeds: means and the mean paired difference to
    self-training on those seeds (too few seeds for an interval)."""
    if not partial:
        return []
    lines = [
        "Arms run on only some seeds (the full set was narrowed part-way to fit the time box on the shared "
        "CPU; too few seeds for a confidence interval, not in the tables below):",
        "",
    ]
    for a, per in partial.items():
        n = len(per)
        mean = {k: statistics.fmean(v[k] for v in per.values()) for k in next(iter(per.values()))}
        lines.append(
            f"- {a}: seeds {sorted(int(x) for x in per)}, test {mean['test']:.4f} vs self-training "
            f"{mean['test_self_training']:.4f} (mean paired difference "
            f"{mean['test'] - mean['test_self_training']:+.4f}, n={n}); validation {mean['val']:.4f} vs "
            f"{mean['val_self_training']:.4f} ({mean['val'] - mean['val_self_training']:+.4f})."
        )
    return lines


def _arms(which: str, extra: list[str] = ()) -> dict[str, dict[str, Any]]:
    """The arm group ``which`` plus the named ``extra`` variants (from VARIANTS or LINEAGE_VARIANTS)."""
    known = {**VARIANTS, **LINEAGE_VARIANTS}
    unknown = [a for a in extra if a not in known]
    if unknown:
        raise SystemExit(f"exp_atso_synthetic: unknown --extra-arms {unknown}; known: {sorted(known)}")
    return {**_group(which), **{a: known[a] for a in extra}}


def _group(which: str) -> dict[str, dict[str, Any]]:
    if which == "main":
        return dict(ARMS)
    if which == "variants":
        return {"self-training": ARMS["self-training"], "supervised": ARMS["supervised"], **VARIANTS}
    if which == "lineage-all":
        return {**{a: ARMS[a] for a in ("supervised", "self-training", "atso")}, **LINEAGE_VARIANTS}
    if which == "lineage":  # the variants that fit the time box at 10 seeds on a shared 2-core CPU
        return {
            **{a: ARMS[a] for a in ("supervised", "self-training", "atso")},
            **{a: LINEAGE_VARIANTS[a] for a in ("atso-lineage", "atso-lineage-long")},
        }
    if which == "baselines":  # supervised, self-training and ATSO as implemented, for --extra-arms
        return {a: ARMS[a] for a in ("supervised", "self-training", "atso")}
    if which == "lines":  # the students that never start from their teacher, next to the baselines
        return {
            **{a: ARMS[a] for a in ("supervised", "self-training", "atso", "atso-m0")},
            **{a: VARIANTS[a] for a in ("self-training-m0", "atso-lineage")},
        }
    return {**ARMS, **VARIANTS}


def _task(name: str, quick: bool) -> dict[str, Any]:
    task = json.loads(json.dumps(TASKS[name]))
    task["shape"] = tuple(task["shape"])
    if quick:
        task.update({k: v for k, v in QUICK.items() if k != "config"})
        task["config"].update(QUICK["config"])
    return task


def make_task(task: dict[str, Any], seed: int):
    """``(data, test cases)`` of ``seed``: labelled, unlabelled (with truth), validation, test."""
    n_lab, n_unl, n_val, n_test = (task[k] for k in ("n_labelled", "n_unlabelled", "n_val", "n_test"))
    ph = make_phantoms(n_lab + n_unl + n_val + n_test, task["shape"], seed=seed, **task["phantom"])
    a, b, c = n_lab, n_lab + n_unl, n_lab + n_unl + n_val
    data = data_from_arrays(ph[:a], ph[a:b], ph[b:c] + ph[c:], normalization="ct")
    test = data.val[n_val:]
    data.val = data.val[:n_val]
    return data, test


def make_config(task: dict[str, Any], seed: int, **overrides: Any) -> ATSOConfig:
    return ATSOConfig(
        num_classes=phantom_num_classes(),
        spatial_dims=len(task["shape"]),
        patch_size=task["shape"],
        seed=seed,
        **{**task["config"], **overrides},
    )


def seed_task(task: dict[str, Any], arms: dict[str, dict[str, Any]], seed: int) -> dict[str, Any]:
    """One seed of the main experiment (module level: runs in spawn workers)."""
    data, test = make_task(task, seed)
    return run_seed(make_config(task, seed), data, test, arms)


def pilot_task(task: dict[str, Any], grid: list[int], seed: int) -> dict[str, Any]:
    """Validation Dice of M0 for each warm-up length (fresh model each), on a pilot seed."""
    data, _ = make_task(task, seed)
    return warmup_sweep(make_config(task, seed), data, grid)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=list(TASKS), default="2d")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument(
        "--arms", default="main", choices=("main", "variants", "lineage", "lineage-all", "lines", "baselines", "all")
    )
    parser.add_argument(
        "--extra-arms",
        nargs="*",
        default=[],
        metavar="ARM",
        help="variants added to the --arms group (names from VARIANTS and LINEAGE_VARIANTS)",
    )
    parser.add_argument("--pilot", action="store_true", help="warm-up sweep + headroom on pilot seeds (validation)")
    parser.add_argument("--pilot-seeds", type=int, nargs="+", default=[100, 101])
    parser.add_argument("--grid", type=int, nargs="+", default=[250, 500, 1000, 2000, 3000])
    parser.add_argument("--warmup-steps", type=int, help="override the task's warm-up length (e.g. the pilot's)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override an ATSOConfig field of the task, e.g. --set steps_per_round=300",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work", help="per-seed cache folder (default /tmp/atso_exp/<stem>)")
    parser.add_argument("--stem", help="output file stem (default atso_synthetic_<task>[_<arms>])")
    parser.add_argument("--record", action="store_true", help="write atso_fast/train/recorded.py (demo reference)")
    parser.add_argument(
        "--record-from",
        metavar="JSON",
        help="only record a finished experiment's JSON (key from --task and --arms), no run",
    )
    return parser.parse_args(argv)


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    task = _task(args.task, args.quick)
    if args.warmup_steps is not None:
        task["config"]["warmup_steps"] = args.warmup_steps
    for item in args.set:
        key, _, value = item.partition("=")
        task["config"][key] = json.loads(value)
    return task


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.record_from:
        entry = record_experiment(Path(args.record_from), _record_key(args))
        print(f"recorded {_record_key(args)!r}: {entry['seeds']} seeds from {args.record_from}")
        return 0
    task = _setup(args)
    meta = machine_meta(args.workers)
    stem = args.stem or (
        f"atso_synthetic_{args.task}"
        + ("_pilot" if args.pilot else "")
        + ("" if args.arms == "main" or args.pilot else f"_{args.arms}")
        + ("_plus" if args.extra_arms and not args.pilot else "")
        + ("_quick" if args.quick else "")
    )
    work = Path(args.work or f"/tmp/atso_exp/{stem}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.pilot:
        return _pilot(args, task, meta, stem, work, out, start)
    arms = _arms(args.arms, args.extra_arms)
    results = run_seeds(
        functools.partial(seed_task, task, arms),
        args.seeds,
        work,
        workers=args.workers,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    results, partial = split_extra_arms(results, arms)
    meta.update(
        seconds=time.perf_counter() - start,
        cpu_seconds=cpu_seconds(results),
        load_after=[round(x, 2) for x in os.getloadavg()],
        task={**task, "shape": list(task["shape"])},
        arms=arms,
        contrasts=contrasts_for(arms),
    )
    summary = summarise(results, meta["contrasts"])
    (out / f"{stem}.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": summary,
                "partial_arms": partial,
                "results": {str(k): v for k, v in results.items()},
            },
            indent=1,
        )
    )
    title = f"ATSO on synthetic phantoms ({args.task}, {len(results)} seeds, arms: {args.arms}" + (
        f" + {', '.join(args.extra_arms)})" if args.extra_arms else ")"
    )
    png = charts(results, out / f"{stem}_monitors.png", title)
    notes = [
        f"Charts: `{png.name}`. Task: {json.dumps({k: v for k, v in meta['task'].items() if k != 'config'})}; "
        f"training: {json.dumps(task['config'])}.",
        "",
        *chosen_on_validation(summary),
        "",
        *partial_lines(partial),
    ]
    text = markdown(results, meta, phantom_class_names()[1:], meta["contrasts"], title, notes)
    (out / f"{stem}.md").write_text(text)
    if args.record:
        record_experiment(out / f"{stem}.json", _record_key(args))
    print(text)
    return 0


def _pilot(args, task, meta, stem, work, out, start) -> int:
    pilot = run_seeds(
        functools.partial(pilot_task, task, args.grid),
        args.pilot_seeds,
        work / "warmup",
        workers=args.workers,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    chosen, means = choose_warmup(pilot)
    print(f"warm-up means {means}; chosen {chosen}", file=sys.stderr, flush=True)
    task["config"]["warmup_steps"] = chosen
    arms = _arms(args.arms, args.extra_arms)
    heads = run_seeds(
        functools.partial(seed_task, task, arms),
        args.pilot_seeds,
        work / f"arms_w{chosen}",
        workers=args.workers,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    val = {a: statistics.fmean(r["arms"][a]["val_mean_dice"] for r in heads.values()) for a in arms}
    headroom = val.get("oracle", math.nan) - val.get("supervised", math.nan)
    meta.update(
        seconds=time.perf_counter() - start,
        cpu_seconds=cpu_seconds(pilot) + cpu_seconds(heads),
        load_after=[round(x, 2) for x in os.getloadavg()],
        task={**task, "shape": list(task["shape"])},
    )
    record = {
        "meta": meta,
        "warmup_means": means,
        "chosen_warmup": chosen,
        "val_final": val,
        "headroom": headroom,
        "warmup": {str(k): v for k, v in pilot.items()},
        "arms": {str(k): v for k, v in heads.items()},
    }
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    lines = [
        f"# ATSO pilot ({args.task}): warm-up length and headroom, validation only, seeds {args.pilot_seeds}",
        "",
        f"{meta['machine']}; {meta['date']}; load {meta['load_before']} -> {meta['load_after']}; "
        f"wall {meta['seconds'] / 60:.1f} min, {meta['cpu_seconds'] / 60:.1f} CPU-min.",
        "",
        "| warm-up steps | " + " | ".join(str(s) for s in means) + " |",
        "|---|" + "---|" * len(means),
        "| val mean Dice of M0 | " + " | ".join(f"{v:.3f}" for v in means.values()) + " |",
        "",
        f"Chosen warm-up (shortest within 0.005 of the best): **{chosen}** steps.",
        "",
        "| arm (from that M0) | final val mean Dice |",
        "|---|---|",
    ]
    lines += [f"| {a} | {v:.3f} |" for a, v in val.items()]
    lines += [
        "",
        f"Headroom (oracle - supervised, validation): **{headroom:+.3f}** "
        + ("(>= 0.02: the task has headroom)" if headroom >= 0.02 else "(< 0.02: make the task harder)"),
        "",
        *pilot_verdict(heads, val),
        "",
        monitor_table(heads),
    ]
    charts(heads, out / f"{stem}_monitors.png", f"ATSO pilot ({args.task}), validation")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _final_monitor(heads: dict[int, dict[str, Any]], arm: str, key: str, k: int = -1) -> float:
    vals = [r["arms"][arm]["rounds"][k][key] for r in heads.values()]
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else math.nan


def pilot_verdict(heads: dict[int, dict[str, Any]], val: dict[str, float]) -> list[str]:
    """Plain lines on the two questions a pilot answers (validation only, fixed before it ran):
    does self-training stall (gain over supervised < 0.005, or its pseudo labels' Dice rising <
    0.005 from M0's), and is the task promising for 10 seeds (headroom >= 0.02 and the best ATSO
    arm >= 0.005 above self-training)."""
    if not {"self-training", "supervised"} <= set(val):
        return []
    st_gain = val["self-training"] - val["supervised"]
    pd0, pd_end = (
        _final_monitor(heads, "self-training", "pseudo_dice_all", 0),
        _final_monitor(heads, "self-training", "pseudo_dice_all"),
    )
    stalls = st_gain < 0.005 or pd_end - pd0 < 0.005
    atso = {a: v for a, v in val.items() if a.startswith("atso")}
    best = max(atso, key=atso.get) if atso else None
    headroom = val.get("oracle", math.nan) - val["supervised"]
    promising = best is not None and headroom >= 0.02 and atso[best] - val["self-training"] >= 0.005
    lines = [
        f"Self-training - supervised (validation): {st_gain:+.4f}; self-training's pseudo-label Dice (all U) "
        f"{pd0:.3f} (M0) -> {pd_end:.3f} (last round); foreground change since M0 after the last round "
        f"{_final_monitor(heads, 'self-training', 'changed_fg_m0'):.3f}. Self-training "
        + ("**stalls** here" if stalls else "**does not stall** here")
        + " (rule: gain < 0.005 or pseudo Dice "
        "rising < 0.005)."
    ]
    if best is not None:
        lines.append(
            f"Best ATSO arm on validation: {best} {atso[best]:.4f} ({atso[best] - val['self-training']:+.4f} "
            f"vs self-training; its pseudo Dice {_final_monitor(heads, best, 'pseudo_dice_all'):.3f}, fg "
            f"change since M0 {_final_monitor(heads, best, 'changed_fg_m0'):.3f}). Task "
            + ("**promising**" if promising else "**not promising**")
            + " for a 10-seed run (rule: headroom "
            ">= 0.02 and best ATSO arm >= 0.005 above self-training)."
        )
    return lines


def _record_key(args: argparse.Namespace) -> str:
    """The key of an experiment in the demo's reference: the task, plus the arm group unless main."""
    return args.task + ("" if args.arms == "main" else f"_{args.arms}")


def record_experiment(source: Path, key: str) -> dict[str, Any]:
    """Add the finished experiment ``source`` (its JSON) to the demo's reference,
    ``atso_fast/train/recorded.py``, under ``key``; returns the entry."""

    def rows(contrasts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keep = ("a", "b", "mean", "ci_low", "ci_high", "p_holm", "n")
        return [{k: round(v, 4) if isinstance(v, float) else v for k, v in c.items() if k in keep} for c in contrasts]

    record = json.loads(Path(source).read_text())
    meta, summary = record["meta"], record["summary"]
    task = meta["task"]
    entry = {
        "setting": f"{len(task['shape'])}D phantoms {tuple(task['shape'])}, {task['n_labelled']} labelled / "
        f"{task['n_unlabelled']} unlabelled, task {key.split('_')[0]!r}",
        "seeds": len(record["results"]),
        "date": meta["date"],
        "source": Path(source).name,
        "endpoint": "final-round test Dice, pooled per class, foreground mean",
        "arms": {a: round(v["test_mean"], 4) for a, v in summary["arms"].items()},
        "chosen_on_validation": max(
            (a for a in summary["arms"] if a.startswith("atso")),
            key=lambda a: summary["arms"][a]["val_mean"],
            default=None,
        ),
        "contrasts": rows(summary["contrasts"]),
        "val_contrasts": rows(summary["val_contrasts"]),
    }
    return write_record(key, entry)


def write_record(key: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Write ``atso_fast/train/recorded.py`` with ``entry`` under ``key`` (the others kept)."""
    recorded = {**RECORDED_NOW, key: entry}
    text = (
        '"""The recorded ATSO experiments the demo compares itself with (key: the task of\n'
        "``benchmarks/exp_atso_synthetic.py``, plus ``_<arms>`` for an arm group other than main).\n\n"
        "Generated by ``benchmarks/exp_atso_synthetic.py --record`` (or ``--record-from``); do not edit by hand.\n"
        '"""\nfrom __future__ import annotations\n\n__all__ = ["RECORDED"]\n\n'
        f"RECORDED = {pprint.pformat(recorded, width=110, sort_dicts=False)}\n"
    )
    Path(__file__).resolve().parents[1].joinpath("atso_fast", "train", "recorded.py").write_text(text)
    RECORDED_NOW.clear()
    RECORDED_NOW.update(recorded)
    return entry


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
