"""Training-step throughput of the ATSO trainer (steps/s), to check that changes do not slow it.

One timed call of ``train_steps`` per setting, through the same path the ATSO rounds use
(``MixedBatches`` over a labelled and a pseudo-labelled ``PatchSampler``, augmentation on, 1
torch thread by default): the 2D phantom setting of ``exp_atso_synthetic.py`` and a small 3D one.
Each setting runs ``--repeats`` times after a short warm-up; the median is reported. With
``--compare DIR`` the same measurement is also run, interleaved (A B A B ...), in a subprocess
whose ``PYTHONPATH`` is ``DIR`` (e.g. a worktree of the commit before a change), so both see the
same machine load.

Usage: python benchmarks/exp_atso_speed.py [--steps 60] [--repeats 5] [--threads 1]
       [--compare OTHER_CHECKOUT] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atso_fast.datasets.synthetic import make_phantoms, phantom_num_classes
from atso_fast.train.augment import AugmentConfig
from atso_fast.train.data import PatchSampler, data_from_arrays
from atso_fast.train.trainer import MixedBatches, train_steps
from atso_fast.train.unet import UNet

__all__ = ["SETTINGS", "measure", "main"]

SETTINGS: dict[str, dict[str, Any]] = {
    "2d": {"shape": (64, 64), "batch_size": 8, "model": {"base_channels": 8, "depth": 4}},
    "3d": {"shape": (16, 32, 32), "batch_size": 2, "model": {"base_channels": 8, "depth": 3}},
}


def _batches(setting: dict[str, Any]) -> MixedBatches:
    ph = make_phantoms(12, setting["shape"], seed=0)
    data = data_from_arrays(ph[:4], ph[4:], normalization="ct")
    kw = {"patch_size": setting["shape"], "num_classes": phantom_num_classes()}
    lab = PatchSampler([c.image for c in data.labelled], [c.label for c in data.labelled], **kw)
    pse = PatchSampler([c.image for c in data.unlabelled], [c.label for c in data.unlabelled], **kw)
    return MixedBatches(lab, pse, setting["batch_size"], labelled_ratio=0.5, augment=AugmentConfig())


def measure(name: str, steps: int) -> float:
    """Steps/s of one ``train_steps`` call of ``steps`` steps (after a 5-step warm-up)."""
    setting = SETTINGS[name]
    torch.manual_seed(0)
    model = UNet(1, phantom_num_classes(), spatial_dims=len(setting["shape"]), **setting["model"])
    batches = _batches(setting)
    train_steps(model, batches, steps=5, lr=1e-3, rng=np.random.default_rng(1))
    start = time.perf_counter()
    train_steps(model, batches, steps=steps, lr=1e-3, rng=np.random.default_rng(2))
    return steps / (time.perf_counter() - start)


def _one(name: str, steps: int, threads: int, other: str | None) -> float:
    if other is None:
        torch.set_num_threads(threads)
        return measure(name, steps)
    env = {**os.environ, "PYTHONPATH": other}
    code = (
        f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); torch.set_num_threads({threads}); "
        f"import exp_atso_speed as s; print(s.measure({name!r}, {steps}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--compare", help="another checkout to time, interleaved, in a subprocess")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "threads": args.threads,
        "load_before": os.getloadavg(),
        "this": str(Path.cwd()),
        "other": args.compare,
    }
    for name in args.settings:
        runs: dict[str, list[float]] = {"this": [], "other": []}
        for _ in range(args.repeats):
            runs["this"].append(_one(name, args.steps, args.threads, None))
            if args.compare:
                runs["other"].append(_one(name, args.steps, args.threads, args.compare))
        results[name] = {k: {"median": statistics.median(v), "runs": v} for k, v in runs.items() if v}
        line = f"{name}: this {results[name]['this']['median']:.2f} steps/s"
        if args.compare:
            line += (
                f", other {results[name]['other']['median']:.2f} steps/s "
                f"(this/other {results[name]['this']['median'] / results[name]['other']['median']:.3f})"
            )
        print(line, flush=True)
    results["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
