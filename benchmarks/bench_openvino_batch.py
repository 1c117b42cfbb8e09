"""OpenVINO static vs dynamic batch axis, network alone, in alternating rounds in one process.

The MONAI UNet 16-256 (2 residual units) is compiled twice: for a static batch ``B`` (short
batches zero-padded to ``B``) and for a dynamic batch ``1..B``. Each round times a full batch and
a short one (``--short`` windows) on both, one request at a time (odd rounds in reverse order),
after checking that the dynamic model's outputs equal the static model's within float32
tolerance. Ratios are medians over rounds of the same round's dynamic / static.

Usage: python benchmarks/bench_openvino_batch.py [--classes 3] [--batch 4] [--window 64] [--short 2]
       [--threads 2] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
from bench_kernels import machine  # benchmarks/ is on sys.path for scripts

import atso_fast
from atso_fast.bench.networks import builtin_network
from atso_fast.runtimes import OpenVinoRuntime

__all__ = ["main"]


def runtimes(pkg, args) -> dict[str, OpenVinoRuntime]:
    kw = {
        "batch_size": args.batch,
        "window": pkg.window,
        "in_channels": pkg.in_channels,
        "threads": args.threads,
        "cache_dir": False,
        "in_flight": 1,
        "streams": 1,
    }
    return {
        "static": OpenVinoRuntime(pkg.onnx_path, dynamic_batch=False, **kw),
        "dynamic": OpenVinoRuntime(pkg.onnx_path, dynamic_batch=True, **kw),
    }


def check_outputs(rts: dict, full: np.ndarray, short: np.ndarray) -> float:
    """Largest |dynamic - static| over the full and the short batch (raises beyond f32 tolerance)."""
    worst = 0.0
    for x in (full, short):
        a, b = rts["static"](x), rts["dynamic"](x)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


def timed_abba(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of every ``fns[name]()`` per round; odd rounds run the methods in reverse order,
    so the one that follows another (and finds its caches warm or cold) changes every round."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return times


def paired_ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of ``a / b`` (same round)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--short", type=int, default=2, help="windows in the short batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    net = builtin_network(args.classes, net="unet")[0]
    win = (args.window,) * 3
    rng = np.random.default_rng(0)
    full = rng.standard_normal((args.batch, 1, *win)).astype(np.float32)
    short = full[: args.short].copy()
    with tempfile.TemporaryDirectory() as tmp:
        pkg = atso_fast.load_package(
            atso_fast.export_model(net, tmp, window=win, num_classes=args.classes, save_torch=False)
        )
        rts = runtimes(pkg, args)
        diff = check_outputs(rts, full, short)
        fns = {
            f"{name} {label}": (lambda rt=rt, x=x: rt(x))
            for label, x in (("full", full), ("short", short))
            for name, rt in rts.items()
        }
        times = timed_abba(fns, args.repeats)
    res = {
        "machine": machine("cpu"),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "classes": args.classes,
        "batch": args.batch,
        "short": args.short,
        "window": list(win),
        "threads": args.threads,
        "repeats": args.repeats,
        "max_abs_diff": diff,
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "min_seconds": {k: min(v) for k, v in times.items()},
        "dynamic_over_static_full": paired_ratio(times, "dynamic full", "static full"),
        "dynamic_over_static_short": paired_ratio(times, "dynamic short", "static short"),
        "seconds_per_round": times,
    }
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
