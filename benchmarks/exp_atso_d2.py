"""Issue 23, experiment D2 (decisive): ATSO as published vs its baselines on the phantom 2D task.

Protocol and decision rule: ``benchmarks/RESULTS.md``, section "Issue 23: D2", written before the
run. In short: task ``2d`` of ``exp_atso_synthetic.py`` (64 x 64 slices, 10 labelled, 90
unlabelled with hidden truth, 50 validation, 100 test per seed; the window is the training patch,
so relabelling is the engine's sliding window over the same context the network trained on),
fresh seeds, one shared warm-up per seed, every arm consolidated (the evaluated model), arms
supervised, self-training, ATSO-reinit, ATSO-continue, Mean Teacher, oracle. Primary endpoint:
consolidated test Dice, per-case mean (each slice's Dice per class, averaged over slices, then
over the foreground classes). Decision contrast: ATSO-reinit - self-training, paired over seeds.

Usage: python benchmarks/exp_atso_d2.py [--seeds 10 ... 19] [--workers 2] [--quick] [--stage 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exp_atso_protocol import charts, cpu_seconds, machine_meta, run_seed, run_seeds  # noqa: E402
from exp_atso_synthetic import _task, make_config, make_task, write_record  # noqa: E402

from atso_fast.datasets.synthetic import phantom_class_names  # noqa: E402
from atso_fast.train.report import contrast_table, paired_contrast  # noqa: E402

ARMS: dict[str, dict[str, Any]] = {
    "supervised": {"method": "supervised"},
    "self-training": {"method": "self-training"},
    "atso-reinit": {"method": "atso", "init": "reinit"},
    "atso-continue": {"method": "atso", "init": "continue"},
    "mean-teacher": {"method": "mean-teacher"},
    "oracle": {"method": "oracle"},
}
# the rule's follow-up if ATSO-reinit wins: re-initialisation without asynchrony (same warm-ups)
FOLLOW_UP: dict[str, dict[str, Any]] = {"self-training-reinit": {"method": "self-training", "init": "reinit"}}
SETTINGS = {"rounds": 2, "consolidate": True}  # fixed before the run (RESULTS.md, "Issue 23: D2")
DECISION = ("atso-reinit", "self-training")
MARGIN = 0.005
CONTRASTS = [
    DECISION,
    ("atso-continue", "self-training"),
    ("atso-reinit", "atso-continue"),
    ("atso-reinit", "mean-teacher"),
    ("atso-reinit", "supervised"),
    ("self-training", "supervised"),
    ("mean-teacher", "supervised"),
    ("oracle", "supervised"),
]


def seed_d2(task: dict[str, Any], arms: dict[str, dict[str, Any]], seed: int) -> dict[str, Any]:
    """One seed: every arm from one warm-up (module level: runs in spawn workers). The warm-up is
    deterministic, so a follow-up run on the same seed starts from the same M0 (paired)."""
    data, test = make_task(task, seed)
    return run_seed(make_config(task, seed, **SETTINGS), data, test, arms)


def verdict(row: dict[str, Any], confidence: float) -> str:
    """The decision rule fixed before the run (see RESULTS.md); stage 2 (97.5%) is the last."""
    if row["ci_low"] > 0 and row["mean"] >= MARGIN:
        return "ATSO helps"
    if row["ci_high"] < MARGIN:
        return "no effect"
    if confidence > 0.95:
        return "inconclusive after the second (last) stage: no claim either way"
    return f"inconclusive at {confidence:.3f}: run the next stage (seeds 20-29, alpha 0.025 per stage)"


def _values(results: dict[int, dict[str, Any]], key: str) -> dict[str, list[float]]:
    return {a: [float(r["arms"][a][key]) for r in results.values()] for a in ARMS}


def _ms(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "-"
    return f"{statistics.fmean(vals):.4f} +- {statistics.stdev(vals):.4f}" if len(vals) > 1 else f"{vals[0]:.4f}"


def report(results: dict[int, dict[str, Any]], meta: dict[str, Any], confidence: float) -> tuple[dict, str]:
    test = _values(results, "test_case_dice")
    decision = {
        **paired_contrast(test[DECISION[0]], test[DECISION[1]], confidence=confidence),
        "a": DECISION[0],
        "b": DECISION[1],
    }
    decision["verdict"] = verdict(decision, confidence)
    summary = {
        "decision": decision,
        "contrasts": contrast_table(test, CONTRASTS),
        "pooled_contrasts": contrast_table(_values(results, "test_mean_dice"), CONTRASTS),
        "val_contrasts": contrast_table(_values(results, "val_mean_dice"), CONTRASTS),
    }
    names = phantom_class_names()[1:]
    rows = list(results.values())
    lines = [
        f"# Issue 23, D2: ATSO as published vs baselines, phantom 2D, seeds {list(results)}",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, 1 thread per process, {meta['workers']} processes; "
        f"{meta['date']}; load {meta['load_before']} -> {meta['load_after']}; "
        f"wall {meta['seconds'] / 60:.1f} min, "
        f"{meta['cpu_seconds'] / 60:.1f} CPU-min. Settings: {json.dumps(SETTINGS)}; arms {json.dumps(ARMS)}.",
        "",
        f"**Decision ({DECISION[0]} - {DECISION[1]}, per-case test Dice, {confidence:.3f} CI): "
        f"{decision['mean']:+.4f} [{decision['ci_low']:+.4f}, {decision['ci_high']:+.4f}], "
        f"{decision['wins']}/{decision['n']} seeds ahead: {decision['verdict']}.**",
        "",
        "## Consolidated test Dice (mean +- SD over seeds)",
        "",
        "| arm | per-case Dice (primary) | pooled Dice | "
        + " | ".join(f"{n} (per case)" for n in names)
        + " | HD95 mm | pseudo Dice on U (final) | val pooled Dice |",
        "|---|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    lines.append(
        "| warm-up M0 | "
        + _ms([r["m0"]["test_case_dice"] for r in rows])
        + " | "
        + _ms([r["m0"]["test_mean_dice"] for r in rows])
        + " |"
        + " - |" * len(names)
        + " - | - | "
        + _ms([r["m0"]["val_mean_dice"] for r in rows])
        + " |"
    )
    for a in ARMS:
        arm = [r["arms"][a] for r in rows]
        per = [_ms([x["test_case"]["dice_mean"][c] for x in arm]) for c in range(len(names))]
        lines.append(
            f"| {a} | {_ms([x['test_case_dice'] for x in arm])} | {_ms([x['test_mean_dice'] for x in arm])} | "
            + " | ".join(per)
            + f" | {_ms([x['test_case']['mean_hd95'] for x in arm])} | "
            f"{_ms([x['pseudo_mean_dice_final'] for x in arm])} | {_ms([x['val_mean_dice'] for x in arm])} |"
        )
    for title, key in (
        ("Paired contrasts, per-case test Dice (Holm over the table)", "contrasts"),
        ("Same, pooled test Dice", "pooled_contrasts"),
        ("Same, validation (pooled)", "val_contrasts"),
    ):
        lines += [
            "",
            f"## {title}",
            "",
            f"| contrast | mean | {confidence:.1%} CI (t) | Wilcoxon p | Holm p | seeds a > b |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['a']} - {c['b']} | {c['mean']:+.4f} | {c['ci_low']:+.4f} to {c['ci_high']:+.4f} | "
            f"{c['p_wilcoxon']:.4f} | {c['p_holm']:.4f} | {c['wins']}/{c['n']} |"
            for c in summary[key]
        ]
    lines += [
        "",
        "## Premise monitor per round (mean over seeds; truth known)",
        "",
        "trained gain = Dice of the round's model on the part it trained on minus the Dice of the labels it "
        "trained on there (lazy learning: ~0); held-out gain = Dice of the part it relabelled, after minus "
        "before; start agreement = the student's Dice against its targets before it trains (1.0: lazy).",
        "",
        "| arm | round | student from | start agreement | trained gain | held-out gain | pseudo Dice (all U) "
        "| val Dice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in ("self-training", "atso-reinit", "atso-continue"):
        for k in range(len(rows[0]["arms"][a]["rounds"])):
            cells = [
                _mean([r["arms"][a]["rounds"][k].get(key) for r in rows])
                for key in (
                    "start_agreement",
                    "premise_trained_gain",
                    "premise_held_gain",
                    "pseudo_dice_all",
                    "val_mean_dice",
                )
            ]
            lines.append(
                f"| {a} | {k} | {rows[0]['arms'][a]['rounds'][k]['student_from'] or '-'} | " + " | ".join(cells) + " |"
            )
    return summary, "\n".join(lines) + "\n"


def _mean(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return f"{statistics.fmean(vals):+.4f}" if vals else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10, 20)))
    parser.add_argument(
        "--stage", type=int, choices=(1, 2), default=1, help="2: the second stage of the rule (alpha 0.025 per stage)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument(
        "--record-from",
        metavar="JSON",
        help="only add a finished D2 run (its JSON) to atso_fast/train/recorded.py as 'd2'",
    )
    parser.add_argument(
        "--follow-up",
        action="store_true",
        help="only the follow-up arm (self-training-reinit), paired with a finished D2 run's JSON",
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.record_from:
        entry = record_d2(Path(args.record_from))
        print(f"recorded 'd2': {entry['seeds']} seeds, {entry['decision']['verdict']}")
        return 0
    task = _task("2d", args.quick)
    stem = "atso_d2" + ("_quick" if args.quick else "") + ("_stage2" if args.stage == 2 else "")
    if args.follow_up:
        return follow_up(args, task, stem)
    meta = machine_meta(args.workers)
    start = time.perf_counter()
    results = run_seeds(
        functools.partial(seed_d2, task, ARMS),
        args.seeds,
        Path(f"/tmp/atso_exp/{stem}"),
        workers=args.workers,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    meta.update(
        seconds=time.perf_counter() - start,
        cpu_seconds=cpu_seconds(results),
        load_after=[round(x, 2) for x in os.getloadavg()],
        task={**task, "shape": list(task["shape"])},
        settings=SETTINGS,
        arms=ARMS,
    )
    confidence = 0.95 if args.stage == 1 else 0.975
    summary, text = report(results, meta, confidence)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "results": {str(k): v for k, v in results.items()}}, indent=1)
    )
    charts(results, out / f"{stem}_monitors.png", f"Issue 23 D2 ({len(results)} seeds)")
    (out / f"{stem}.md").write_text(text)
    print(text)
    return 0


def record_d2(source: Path) -> dict[str, Any]:
    """The demo's reference entry ``d2`` from a finished run's JSON (arm means and contrasts on
    the primary endpoint, the decision as the rule read it)."""

    def rows(contrasts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        keep = ("a", "b", "mean", "ci_low", "ci_high", "p_holm", "n")
        return [{k: round(v, 4) if isinstance(v, float) else v for k, v in c.items() if k in keep} for c in contrasts]

    record = json.loads(source.read_text())
    meta, summary, results = record["meta"], record["summary"], record["results"]
    decision = summary["decision"]
    entry = {
        "setting": "2D phantoms (64, 64), 10 labelled / 90 unlabelled, task '2d', 2 rounds, consolidated",
        "seeds": len(results),
        "date": meta["date"],
        "source": source.name,
        "endpoint": "consolidated test Dice, per-case mean, foreground mean",
        "arms": {
            a: round(statistics.fmean(r["arms"][a]["test_case_dice"] for r in results.values()), 4)
            for a in next(iter(results.values()))["arms"]
        },
        "contrasts": rows(summary["contrasts"]),
        "val_contrasts": rows(summary["val_contrasts"]),
        "decision": {
            "a": decision["a"],
            "b": decision["b"],
            "mean": round(decision["mean"], 4),
            "ci_low": round(decision["ci_low"], 4),
            "ci_high": round(decision["ci_high"], 4),
            "verdict": verdict(decision, 0.975 if "stage2" in source.name else 0.95),  # the rule, not a stored string
        },
    }
    return write_record("d2", entry)


def follow_up(args: argparse.Namespace, task: dict[str, Any], stem: str) -> int:
    """self-training-reinit on the seeds of ``OUT/<stem>.json``, against its atso-reinit and
    self-training arms (same warm-ups): separates re-initialisation from asynchrony."""
    main_run = json.loads((Path(args.out) / f"{stem}.json").read_text())["results"]
    start = time.perf_counter()
    results = run_seeds(
        functools.partial(seed_d2, task, FOLLOW_UP),
        args.seeds,
        Path(f"/tmp/atso_exp/{stem}_follow"),
        workers=args.workers,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    for seed, r in results.items():  # the same M0: checked, not assumed
        if abs(r["m0"]["val_mean_dice"] - main_run[str(seed)]["m0"]["val_mean_dice"]) > 1e-9:
            raise SystemExit(f"seed {seed}: the follow-up's warm-up differs from the main run's")
    arm = "self-training-reinit"
    values = {
        a: [float(main_run[str(s)]["arms"][a]["test_case_dice"]) for s in results]
        for a in ("atso-reinit", "self-training")
    }
    values[arm] = [float(r["arms"][arm]["test_case_dice"]) for r in results.values()]
    rows = contrast_table(values, [("atso-reinit", arm), (arm, "self-training")])
    lines = [
        f"# Issue 23, D2 follow-up: {arm}, seeds {list(results)}",
        "",
        f"wall {(time.perf_counter() - start) / 60:.1f} min; per-case test Dice: {arm} "
        f"{statistics.fmean(values[arm]):.4f}",
        "",
        "| contrast | mean | 95% CI | Holm p | seeds a > b |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['a']} - {c['b']} | {c['mean']:+.4f} | {c['ci_low']:+.4f} to {c['ci_high']:+.4f} | "
        f"{c['p_holm']:.4f} | {c['wins']}/{c['n']} |"
        for c in rows
    ]
    text = "\n".join(lines) + "\n"
    (Path(args.out) / f"{stem}_follow_up.json").write_text(
        json.dumps({"contrasts": rows, "values": values, "results": {str(k): v for k, v in results.items()}}, indent=1)
    )
    (Path(args.out) / f"{stem}_follow_up.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
