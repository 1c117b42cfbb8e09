"""Issue 23, experiment D1 (the mismatch check): on real CT 2D, does relabelling whole slices with a
network trained on 64 x 64 patches (the old experiments' shortcut) explain why semi-supervised
training fell below supervised?

Protocol and reading rule: ``benchmarks/RESULTS.md``, section "Issue 23: D1", written before the
run. Per seed (0 and 1; the interleaved split of ``exp_atso_real.py``, CT axial slices of
101 x 122 voxels, 14 labelled, 56 unlabelled, 7 validation, 14 test): one warm-up M0 (2000
steps, the earlier pilot's choice); M0 scored on validation and test with whole-slice inference
and with the engine's sliding window (window = training patch); then, from that M0, supervised,
self-training relabelling through the engine, and self-training relabelling whole slices (the
old path, kept here only to measure it), 2 rounds each, consolidated.

Usage: python benchmarks/exp_atso_d1.py [--seeds 0 1] [--workers 2] [--quick] [--data DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exp_atso_protocol import cpu_seconds, machine_meta, run_seeds, summarise_run  # noqa: E402
from exp_atso_real import DATASETS, DEFAULT_DATA, load_volume, make_split  # noqa: E402

from atso_fast.train.atso import ATSO, ATSOConfig, default_relabel_fn  # noqa: E402
from atso_fast.train.monitor import pooled_dice  # noqa: E402

SETTINGS = {"warmup_steps": 2000, "rounds": 2, "consolidate": True}
ARMS = {
    "supervised": ({"method": "supervised"}, "engine"),
    "self-training (engine, window = patch)": ({"method": "self-training"}, "engine"),
    "self-training (whole slices, old path)": ({"method": "self-training"}, "whole"),
}


def whole_slice_relabel_fn(config: ATSOConfig):
    """The old experiments' shortcut, kept only to measure it: the network on the whole slice at
    once (zero-padded to a multiple of its divisor and cropped back), not on training-size windows."""

    @torch.no_grad()
    def relabel(model: torch.nn.Module, volumes: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        div = int(getattr(model, "divisor", 1))
        out = []
        for vol in volumes:
            x = torch.from_numpy(np.ascontiguousarray(vol, np.float32)).movedim(1, 0)  # (Z, M, Y, X)
            spatial = x.shape[2:]
            x = torch.nn.functional.pad(x, [a for s in reversed(spatial) for a in (0, -s % div)])
            probs = torch.softmax(model(x).float(), 1)[..., : spatial[0], : spatial[1]].movedim(0, 1)
            conf, labels = probs.max(0)
            out.append((labels.numpy().astype(np.uint8), (conf * 255).round().numpy().astype(np.uint8)))
        return out

    return relabel


def _dice(run: ATSO, cases: Sequence[Any], relabel) -> float:
    preds = [r[0] for r in relabel(run.model.eval(), [c.image for c in cases])]
    return pooled_dice(preds, [c.label for c in cases], run.config.num_classes, ignore_index=255)[1]


def seed_d1(folder: str, quick: bool, seed: int) -> dict[str, Any]:
    """One seed (module level: runs in spawn workers)."""
    start, cpu = time.perf_counter(), time.process_time()
    spec = DATASETS["ct"]
    image, label = load_volume(Path(folder), spec["classes"])
    data, test, _ = make_split(spec, image, label, seed, 2)
    settings = {**SETTINGS, **({"warmup_steps": 10, "steps_per_round": 3} if quick else {})}
    config = ATSOConfig(
        num_classes=len(spec["classes"]) + 1, spatial_dims=2, seed=seed, **{**spec["train"], **settings}
    )
    warm = ATSO(ATSOConfig.from_dict({**config.to_dict(), "method": "self-training"}), data=data)
    warm.warmup()
    whole, engine = whole_slice_relabel_fn(warm.config), default_relabel_fn(warm.config)
    m0 = {
        f"{split}_{path}": _dice(warm, cases, fn)
        for split, cases in (("val", data.val), ("test", test))
        for path, fn in (("whole", whole), ("engine", engine))
    }
    state, arms = warm.state_dict(), {}
    for name, (overrides, path) in ARMS.items():
        cfg = ATSOConfig.from_dict({**warm.config.to_dict(), **overrides})
        run = ATSO(cfg, relabeler=whole_slice_relabel_fn(cfg) if path == "whole" else None, data=data)
        run.load_state_dict(state)
        run.run()
        arms[name] = summarise_run(run, test)  # scored through the engine (the product's path)
    return {
        "m0": m0,
        "arms": arms,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "shape": list(image.shape),
    }


def _ms(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    return f"{statistics.fmean(vals):.4f}" + (f" ({', '.join(f'{v:.4f}' for v in vals)})" if len(vals) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    folder = Path(args.data) / DATASETS["ct"]["folder"]
    if not (folder / "image.nii.gz").is_file():
        print(f"exp_atso_d1: skipped, no real CT at {folder}")
        return 0
    stem = "atso_d1" + ("_quick" if args.quick else "")
    meta, start = machine_meta(args.workers), time.perf_counter()
    results = run_seeds(
        functools.partial(seed_d1, str(folder), args.quick),
        args.seeds,
        Path(f"/tmp/atso_exp/{stem}"),
        workers=args.workers,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    meta.update(
        seconds=time.perf_counter() - start,
        cpu_seconds=cpu_seconds(results),
        load_after=[round(x, 2) for x in os.getloadavg()],
        settings=SETTINGS,
    )
    rows = list(results.values())
    lines = [
        f"# Issue 23, D1: whole-slice vs sliding-window relabelling on real CT 2D, seeds {list(results)}",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}, 1 thread per process; {meta['date']}; load "
        f"{meta['load_before']} -> {meta['load_after']}; wall {meta['seconds'] / 60:.1f} min. Settings "
        f"{json.dumps(SETTINGS)} on `exp_atso_real.py`'s CT 2D task (patch 64 x 64, slices "
        f"{rows[0]['shape'][1:]}).",
        "",
        "Values: mean (seed values). Pooled foreground Dice.",
        "",
        "| M0 scored with | validation | test |",
        "|---|---|---|",
        f"| whole slice | {_ms([r['m0']['val_whole'] for r in rows])} | {_ms([r['m0']['test_whole'] for r in rows])} |",
        f"| sliding window (window = patch) | {_ms([r['m0']['val_engine'] for r in rows])} | "
        f"{_ms([r['m0']['test_engine'] for r in rows])} |",
        "",
        "| arm (consolidated, scored through the engine) | test pooled | test per-case | val pooled "
        "| pseudo Dice on U (final) |",
        "|---|---|---|---|---|",
    ]
    for a in ARMS:
        arm = [r["arms"][a] for r in rows]
        cells = [
            _ms([x[key] for x in arm])
            for key in ("test_mean_dice", "test_case_dice", "val_mean_dice", "pseudo_mean_dice_final")
        ]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "results": {str(k): v for k, v in results.items()}}, indent=1)
    )
    (out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
