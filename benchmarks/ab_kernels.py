"""Paired A/B of two builds of ``atso_fast._C`` in one process: the same kernel calls, alternated.

Both compiled modules are loaded side by side (``_C`` registers only functions, so two copies
coexist), checked to give the same bits, then timed call by call in alternating order (ABBA),
so a slow spell of a shared machine hits both alike. Reports, per kernel, the median of the
per-pair ratios B/A and the ratio of the fastest calls, which on a loaded machine is the
steadier of the two. Cases are bench_kernels.py's (96x160x160 volume, 48x64x64 windows, overlap
0.5, batches of 4).

Usage: python benchmarks/ab_kernels.py A_CHECKOUT B_CHECKOUT [--pairs 40] [--classes 3 32]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import numpy as np

from atso_fast.engine.windows import gaussian_importance, sliding_window_origins

__all__ = ["main"]


def load_c(checkout: str, tag: str):
    """The compiled ``_C`` of ``checkout`` as module ``<tag>._C``."""
    path = next(Path(checkout, "atso_fast").glob("_C.*.so"))
    spec = importlib.util.spec_from_file_location(f"{tag}._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def accumulate_case(classes: int, shape, patch, batch: int):
    """``run(C)`` adds every batch into a zeroed slab and returns it."""
    origins = sliding_window_origins(shape, patch, 0.5)
    groups = [np.ascontiguousarray(origins[i : i + batch]) for i in range(0, len(origins) - batch + 1, batch)]
    patches = np.random.default_rng(0).standard_normal((batch, classes, *patch), dtype=np.float32)
    imp = np.ascontiguousarray(gaussian_importance(patch))
    acc, wsum = np.zeros((classes, *shape), np.float32), np.zeros(shape, np.float32)

    def run(c):
        acc.fill(0), wsum.fill(0)
        t = time.perf_counter()
        for g in groups:
            c.accumulate(acc=acc, wsum=wsum, patches=patches, origins=g, importance=imp, z0=0, algorithm="auto")
        return time.perf_counter() - t, (acc.copy(), wsum.copy())

    return run


def finalize_case(classes: int, shape):
    rng = np.random.default_rng(1)
    acc = rng.standard_normal((classes, *shape), dtype=np.float32)
    wsum = (rng.random(shape, dtype=np.float32) + 0.5).astype(np.float32)

    def run(c):
        t = time.perf_counter()
        out = c.finalize(
            acc=acc, wsum=wsum, threshold=0.5, ignore_index=255, kind="logits", rows=None, algorithm="auto"
        )
        return time.perf_counter() - t, out

    return run


def extract_case(shape, patch):
    volume = np.random.default_rng(2).standard_normal(shape, dtype=np.float32)
    origins = sliding_window_origins(shape, patch, 0.5)

    def run(c):
        t = time.perf_counter()
        out = c.extract_patches(
            volume=volume,
            origins=origins,
            patch_size=patch,
            pad_value=0.0,
            out=None,
            out_dtype="float32",
            algorithm="auto",
        )
        return time.perf_counter() - t, out

    return run


def same(x, y) -> bool:
    if isinstance(x, tuple):
        return all(same(a, b) for a, b in zip(x, y))
    return np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


def paired(run, mods, pairs: int) -> dict:
    """Alternating A B B A ... timings; median per-pair ratio and fastest-call ratio B/A."""
    _, out_a = run(mods[0])
    _, out_b = run(mods[1])
    if not same(out_a, out_b):
        raise SystemExit("the two builds disagree; fix that before timing")
    times: list[list[float]] = [[], []]
    for p in range(pairs):
        order = (0, 1) if p % 2 == 0 else (1, 0)
        for i in order:
            times[i].append(run(mods[i])[0])
    ratios = [b / a for a, b in zip(*times)]
    return {
        "a": statistics.median(times[0]),
        "b": statistics.median(times[1]),
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(times[1]) / min(times[0]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--classes", type=int, nargs="+", default=[3, 32])
    args = ap.parse_args(argv)
    mods = [load_c(args.a, "build_a"), load_c(args.b, "build_b")]
    shape, patch = (96, 160, 160), (48, 64, 64)
    cases = [("extract_patches", 1, extract_case(shape, patch))]
    for c in args.classes:
        cases += [("accumulate", c, accumulate_case(c, shape, patch, 4)), ("finalize", c, finalize_case(c, shape))]
    print(
        f"# A {args.a}, B {args.b}; {args.pairs} alternating pairs; {time.strftime('%Y-%m-%d %H:%M')}, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    print(f"{'kernel':<16}{'C':>4}{'A s':>9}{'B s':>9}{'B/A median':>12}{'B/A fastest':>13}")
    for name, c, run in cases:
        r = paired(run, mods, args.pairs)
        print(f"{name:<16}{c:>4}{r['a']:>9.4f}{r['b']:>9.4f}{r['median_ratio']:>12.3f}{r['min_ratio']:>13.3f}")
    print(f"# load after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
