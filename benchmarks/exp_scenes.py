"""ATSO on driving scenes under a domain shift (issue 24): supervised vs self-training vs
ATSO (reinit) vs Mean Teacher, labelled on clear-day scenes, adapted to and tested on fog.

Protocol (fixed before any run; nothing below is chosen on test or validation results):

* Data, per seed ``s`` (procedural scenes, :mod:`atso_fast.datasets.driving`, Cityscapes layout,
  19 trainId classes of which the generator draws 10): dataset A, domain ``day``, generator seed
  ``1000 + s``: 20 labelled frames. Dataset B, domain ``fog`` (``--target dusk``: the secondary
  setting, reported in its own files), generator seed ``2000 + s``: 100 unlabelled frames (their
  truth hidden from training, read only by the pseudo-label monitors), 20 validation frames and
  50 test frames, disjoint. Frames 128 x 256. The transfer data form:
  ``{cityscapes: A, labelled: train, unlabelled_root: B, unlabelled: train, val_root: B, val: val}``.
* Model: a ResNet-18 U-Net (``model: {name: resnet_unet, layers: 18}``, default decoder), encoder
  initialised at random (no ImageNet weights are downloaded; ``--encoder-weights PATH`` gives a
  pretrained encoder: another setting, recorded in the JSON and the markdown title).
* Training: road-scene augmentation (scale 0.5-2.0, 128 x 128 crops, horizontal flip, colour
  jitter 0.2), batch 8, AdamW, warm-up 600 steps at lr 1e-3, 3 rounds of 150 steps at 5e-4,
  consolidation on, labelled ratio 0.5, no confidence threshold, ImageNet normalisation; the
  trainer's defaults otherwise. ``atso-reinit`` restarts every student from theta0 with the
  warm-up's schedule (the CVPR reading).
* Arms, per seed from one shared warm-up (M0, labelled frames only): ``supervised``,
  ``self-training``, ``atso-reinit``, ``mean-teacher``.
* Seeds 0-9 (paired: every arm of a seed shares data, warm-up and split).
* Primary endpoint: pooled test mIoU (one confusion matrix over the 50 test frames; classes
  absent from truth and prediction left out) of each arm's final, consolidated model. Secondary:
  the mean per-image test mIoU, M0's test mIoU (the source-only baseline), validation mIoU
  (monitor only: no choice is made on it), per-class test IoU.
* Contrasts (a - b, paired over seeds): atso-reinit - self-training (primary), atso-reinit -
  supervised, atso-reinit - mean-teacher, self-training - supervised, mean-teacher - supervised:
  mean difference with a 95% Student-t interval, Wilcoxon signed-rank p, Holm over the five
  (:func:`atso_fast.train.report.contrast_table`).

``--size small`` (written 2026-12-06 05:45 UTC, before any run of it, because the protocol above
needs ~7 h of a 2-core machine): everything as above but frames 96 x 192; per seed 10 labelled
(A), 60 unlabelled, 10 validation and 30 test frames (B); 96 x 96 crops; warm-up 300 steps, 3
rounds of 100; the ResNet-18 encoder with a narrower decoder (64, 32, 32, 16, 16 channels);
seeds 0-9. Reading of the primary contrast atso-reinit - self-training (pooled test mIoU, 95% t
interval over the 10 seeds): "ATSO helps" if the interval lies above 0; "no effect" if it lies
within -0.01 to +0.01; "ATSO hurts" if it lies below 0; else "inconclusive". The other contrasts
are reported with Holm's correction and not read as verdicts.

``--quick`` runs the same pipeline at toy size (2 seeds, a few steps, 64 x 128 frames) to check
that it works; its numbers mean nothing. Results go to ``--out`` (default benchmarks/results):
``scenes_<target>[_small|_quick].json`` and ``.md``; finished seeds are cached in
``scenes_<target>[_small|_quick]_work/`` so an interrupted run resumes.

Usage: python benchmarks/exp_scenes.py [--size full|small|quick] [--target fog|dusk] [--seeds 0 1 ...] [--workers 1]
       [--encoder-weights resnet18.pth] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atso_fast.datasets.cityscapes import TRAIN_NAMES
from atso_fast.datasets.driving import make_driving_cityscapes
from atso_fast.train.atso import ATSO, run_methods
from atso_fast.train.report import contrast_table
from atso_fast.train.scene_data import scene_cases

__all__ = ["SETTINGS", "ARMS", "CONTRASTS", "make_data", "make_config", "run_seed", "summarise", "markdown", "main"]

SETTINGS: dict[str, dict[str, Any]] = {
    "full": {
        "height": 128,
        "width": 256,
        "n_labelled": 20,
        "n_unlabelled": 100,
        "n_val": 20,
        "n_test": 50,
        "seeds": list(range(10)),
        "config": {
            "patch_size": [128, 128],
            "batch_size": 8,
            "warmup_steps": 600,
            "rounds": 3,
            "steps_per_round": 150,
            "lr": 1e-3,
            "round_lr": 5e-4,
            "model": {"name": "resnet_unet", "layers": 18},
        },
    },
    "small": {
        "height": 96,
        "width": 192,
        "n_labelled": 10,
        "n_unlabelled": 60,
        "n_val": 10,
        "n_test": 30,
        "seeds": list(range(10)),
        "config": {
            "patch_size": [96, 96],
            "batch_size": 8,
            "warmup_steps": 300,
            "rounds": 3,
            "steps_per_round": 100,
            "lr": 1e-3,
            "round_lr": 5e-4,
            "model": {"name": "resnet_unet", "layers": 18, "decoder_channels": [64, 32, 32, 16, 16]},
        },
    },
    "quick": {
        "height": 64,
        "width": 128,
        "n_labelled": 4,
        "n_unlabelled": 6,
        "n_val": 2,
        "n_test": 4,
        "seeds": [0, 1],
        "config": {
            "patch_size": [64, 64],
            "batch_size": 2,
            "warmup_steps": 6,
            "rounds": 1,
            "steps_per_round": 3,
            "lr": 1e-3,
            "round_lr": 5e-4,
            "model": {"name": "resnet_unet", "layers": 18, "decoder_channels": [16, 16, 16, 16, 16]},
        },
    },
}
ARMS: dict[str, dict[str, Any]] = {
    "supervised": {"method": "supervised"},
    "self-training": {"method": "self-training"},
    "atso-reinit": {"method": "atso", "init": "reinit"},
    "mean-teacher": {"method": "mean-teacher"},
}
CONTRASTS = [
    ("atso-reinit", "self-training"),
    ("atso-reinit", "supervised"),
    ("atso-reinit", "mean-teacher"),
    ("self-training", "supervised"),
    ("mean-teacher", "supervised"),
]
SOURCE, SOURCE_SEED, TARGET_SEED = "day", 1000, 2000


def make_data(folder: Path, setting: Mapping[str, Any], seed: int, target: str) -> tuple[Path, Path]:
    """Dataset A (source, labelled) and dataset B (target: unlabelled, val, test) of one seed."""
    size = {"height": setting["height"], "width": setting["width"]}
    a = make_driving_cityscapes(
        folder / "A", splits={"train": setting["n_labelled"]}, domain=SOURCE, seed=SOURCE_SEED + seed, **size
    )
    b = make_driving_cityscapes(
        folder / "B",
        splits={"train": setting["n_unlabelled"], "val": setting["n_val"], "test": setting["n_test"]},
        domain=target,
        seed=TARGET_SEED + seed,
        **size,
    )
    return a, b


def make_config(
    setting: Mapping[str, Any], a: Path, b: Path, seed: int, encoder_weights: str | None = None
) -> dict[str, Any]:
    """The shared ATSO config of one seed (the transfer data form)."""
    config = json.loads(json.dumps(setting["config"]))
    if encoder_weights:
        config["model"]["encoder_weights"] = str(encoder_weights)
    data = {
        "cityscapes": str(a),
        "labelled": "train",
        "unlabelled_root": str(b),
        "unlabelled": "train",
        "val_root": str(b),
        "val": "val",
    }
    return {
        "data": data,
        "num_classes": 19,
        "in_channels": 3,
        "spatial_dims": 2,
        "augment": {"kind": "scene"},
        "seed": seed,
        "progress": False,
        **config,
    }


def _clean(value: Any) -> Any:
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _test_row(run: ATSO, test: Sequence[Any]) -> dict[str, Any]:
    result = run.evaluate(test)
    return {
        "test_miou": result["miou"],
        "test_miou_per_image": result["miou_per_image"],
        "test_iou": result["iou"],
        "test_mean_dice": result["mean_dice"],
    }


def run_seed(seed: int, size: str, target: str, encoder_weights: str | None = None) -> dict[str, Any]:
    """Every arm of one seed from one shared warm-up; M0's test mIoU too."""
    torch.set_num_threads(1)
    setting = SETTINGS[size]
    start, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="exp_scenes_") as tmp:
        a, b = make_data(Path(tmp), setting, seed, target)
        config = make_config(setting, a, b, seed, encoder_weights)
        m0: dict[str, Any] = {}

        def keep_m0(run: ATSO, metrics: dict[str, Any]) -> None:
            if metrics["round"] == 0 and not m0:
                m0.update(
                    _test_row(run, scene_cases(b, "test", run.config.normalization)), val_miou=metrics["val_miou"]
                )

        runs = run_methods(config, ARMS, callbacks=[keep_m0])
        test = scene_cases(b, "test", next(iter(runs.values())).config.normalization)
        arms = {
            name: {
                **_test_row(run, test),
                "val_miou": run.history[-1]["val_miou"],
                "seconds": sum(h["seconds"] for h in run.history[1:]),
                "rounds": [
                    {
                        "round": h["round"],
                        "stage": h["stage"],
                        "val_miou": h["val_miou"],
                        "train_loss": h["train"]["loss"],
                        "pseudo_dice_all": h.get("pseudo_dice_all"),
                    }
                    for h in run.history
                ],
            }
            for name, run in runs.items()
        }
    classes = sorted({int(v) for case in test for v in np.unique(case.label)} - {255})
    return _clean(
        {
            "seed": seed,
            "arms": arms,
            "m0": m0,
            "test_classes": classes,
            "warmup_seconds": next(iter(runs.values())).history[0]["seconds"],
            "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu,
        }
    )


def _run_cached(seed: int, size: str, target: str, encoder_weights: str | None, work: Path) -> dict[str, Any]:
    path = work / f"seed_{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = run_seed(seed, size, target, encoder_weights)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return result


def run_seeds(
    seeds: Sequence[int], size: str, target: str, encoder_weights: str | None, work: Path, workers: int
) -> dict[int, dict[str, Any]]:
    """Every seed, cached in ``work``; ``workers`` single-thread processes (1: this process)."""
    work.mkdir(parents=True, exist_ok=True)
    args = [(s, size, target, encoder_weights, work) for s in seeds]
    if workers <= 1:
        results = [_run_cached(*a) for a in args]
    else:
        with ProcessPoolExecutor(min(workers, len(args)), mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_run_cached, *zip(*args)))
    for r in results:
        print(
            f"seed {r['seed']}: {r['seconds']:.0f} s; test mIoU "
            + ", ".join(f"{a} {_num(v['test_miou'])}" for a, v in r["arms"].items()),
            file=sys.stderr,
            flush=True,
        )
    return {r["seed"]: r for r in results}


def _num(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _ms(values: Sequence[float | None]) -> str:
    kept = [v for v in values if v is not None]
    if not kept:
        return "-"
    return f"{statistics.fmean(kept):.4f} +- {statistics.stdev(kept):.4f}" if len(kept) > 1 else f"{kept[0]:.4f}"


def _mean(values: Sequence[float | None]) -> str:
    kept = [v for v in values if v is not None]
    return f"{statistics.fmean(kept):.3f}" if kept else "-"


def summarise(results: Mapping[int, dict[str, Any]]) -> dict[str, Any]:
    """Per-arm means and the paired contrasts on the primary endpoint (and on validation)."""
    rows = list(results.values())
    arms = list(rows[0]["arms"])
    test = {a: [r["arms"][a]["test_miou"] for r in rows] for a in arms}
    val = {a: [r["arms"][a]["val_miou"] for r in rows] for a in arms}
    pairs = [(a, b) for a, b in CONTRASTS if a in test and b in test]
    complete = all(v is not None for a in arms for v in test[a] + val[a])
    return {
        "arms": {
            a: {
                "test_miou": statistics.fmean(test[a]) if complete else None,
                "val_miou": statistics.fmean(val[a]) if complete else None,
            }
            for a in arms
        },
        "contrasts": _clean(contrast_table(test, pairs)) if complete else [],
        "val_contrasts": _clean(contrast_table(val, pairs)) if complete else [],
    }


def _contrast_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| contrast | mean difference | 95% CI (t) | Wilcoxon p | Holm p | seeds a > b |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['a']} - {r['b']} | {_num(r['mean'], '+.4f')} | {_num(r['ci_low'], '+.4f')} to "
            f"{_num(r['ci_high'], '+.4f')} | {_num(r['p_wilcoxon'], '.4f')} | {_num(r['p_holm'], '.4f')} | "
            f"{r['wins']}/{r['n']} |"
        )
    return lines


def markdown(results: Mapping[int, dict[str, Any]], summary: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """Tables: test mIoU per arm (pooled, per image), per-class IoU, paired contrasts."""
    rows = list(results.values())
    arms = list(rows[0]["arms"])
    used = sorted({k for r in rows for k in r["test_classes"]})
    lines = [
        f"# {meta['title']}",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, 1 thread per process, "
        f"{meta['workers']} process(es); {meta['date']}; seeds {list(results)}; "
        f"wall {meta['seconds'] / 60:.1f} min, {meta['cpu_seconds'] / 60:.1f} CPU-min.",
        "",
        "## Primary endpoint: pooled test mIoU of the final model (mean +- SD over seeds)",
        "",
        "| arm | test mIoU (pooled) | test mIoU (per image) | val mIoU | train s |",
        "|---|---|---|---|---|",
    ]
    lines.append(
        f"| warm-up M0 (source only) | {_ms([r['m0']['test_miou'] for r in rows])} | "
        f"{_ms([r['m0']['test_miou_per_image'] for r in rows])} | "
        f"{_ms([r['m0']['val_miou'] for r in rows])} | - |"
    )
    for a in arms:
        lines.append(
            f"| {a} | {_ms([r['arms'][a]['test_miou'] for r in rows])} | "
            f"{_ms([r['arms'][a]['test_miou_per_image'] for r in rows])} | "
            f"{_ms([r['arms'][a]['val_miou'] for r in rows])} | "
            f"{statistics.fmean(r['arms'][a]['seconds'] for r in rows):.0f} |"
        )
    lines += [
        "",
        "## Test IoU per class (mean over seeds; the classes of the test frames' truth)",
        "",
        "| arm | " + " | ".join(TRAIN_NAMES[k] for k in used) + " |",
        "|---|" + "---|" * len(used),
    ]
    for a in arms:
        lines.append(f"| {a} | " + " | ".join(_mean([r["arms"][a]["test_iou"][k] for r in rows]) for k in used) + " |")
    lines += [
        "",
        "## Paired contrasts, test mIoU (Holm over this table)",
        "",
        *_contrast_lines(summary["contrasts"]),
        "",
        "Same contrasts on validation (a monitor: nothing was chosen on it):",
        "",
        *_contrast_lines(summary["val_contrasts"]),
    ]
    return "\n".join(lines) + "\n"


def _meta(args: argparse.Namespace, seconds: float, results: Mapping[int, dict[str, Any]]) -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    size = {"quick": "quick check: numbers mean nothing", "full": "full protocol", "small": "small protocol"}[args.size]
    init = "pretrained encoder" if args.encoder_weights else "random encoder init"
    title = f"ATSO on driving scenes, day -> {args.target} ({size}, {init})"
    return {
        "title": title,
        "machine": f"{platform.processor() or platform.machine()}, {cores} cores, CPU only",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "workers": args.workers,
        "date": time.strftime("%Y-%m-%d"),
        "seconds": seconds,
        "cpu_seconds": sum(r["cpu_seconds"] for r in results.values()),
        "target": args.target,
        "size": args.size,
        "encoder_weights": args.encoder_weights,
        "setting": SETTINGS[args.size],
        "arms": ARMS,
        "contrasts": CONTRASTS,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size",
        choices=sorted(SETTINGS),
        default="full",
        help="full (the first protocol, ~7 h on 2 cores), small (the 2-core protocol), quick (toy sizes, "
        "2 seeds: checks the pipeline, < 2 min); default: full",
    )
    parser.add_argument("--quick", action="store_true", help="the same as --size quick")
    parser.add_argument("--target", choices=["fog", "dusk"], default="fog", help="target domain (default: fog)")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the protocol's (0-9; quick: 0 1)")
    parser.add_argument("--workers", type=int, default=1, help="processes, one torch thread each (default: 1)")
    parser.add_argument("--encoder-weights", help="a torchvision ResNet-18 state_dict (another setting)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    args.size = "quick" if args.quick else args.size
    seeds = args.seeds or SETTINGS[args.size]["seeds"]
    suffix = "" if args.size == "full" else f"_{args.size}"
    name = f"scenes_{args.target}{suffix}{'_pretrained' if args.encoder_weights else ''}"
    out = Path(args.out)
    start = time.perf_counter()
    results = run_seeds(seeds, args.size, args.target, args.encoder_weights, out / f"{name}_work", args.workers)
    meta = _meta(args, time.perf_counter() - start, results)
    summary = summarise(results)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": summary, "seeds": results}, indent=1))
    text = markdown(results, summary, meta)
    (out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
