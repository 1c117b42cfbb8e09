"""Resampling the blended logits back to the scan's grid (``ResampleSink``), alone.

A 105-class slab on a 1.5 mm target grid (Zt x 273 x 273) goes back to 0.8 mm (Zn x 512 x 512),
order 1 on every axis, fed 8 target rows per call as the slab merger would, and finished by the
label sink (softmax, argmax, confidence). Reports seconds per native row (the export stage of
``bench_nnunet.py memory`` is this, times Zn, plus the write), for the unfused path (torch's
bilinear, then the label sink) and the fused one (``native.resample_finalize``), interleaved in
one run, and whether their labels and confidence are identical (exit status 1 if not).

Usage:
    flock /work/bench.lock python benchmarks/bench_resample_back.py [--rows 40] [--classes 105] [--paths fused]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from atso_fast.engine.merger import ArrayBackend, LabelSink
from atso_fast.engine.preprocess import axis_op
from atso_fast.engine.resample import ResampleSink
from atso_fast.kernels import native

__all__ = ["main"]


def run_once(classes: int, zn: int, threads: int, fuse: bool) -> tuple[float, np.ndarray, np.ndarray]:
    """Seconds to resample and finish ``zn`` native rows, the labels and the confidence."""
    torch.set_num_threads(threads)
    zt, yt, yn = round(zn * 0.8 / 1.5), 273, 512
    ops = [axis_op(zt, zn, 1), axis_op(yt, yn, 1), axis_op(yt, yn, 1)]
    rng = np.random.default_rng(0)
    slab = rng.standard_normal((classes, 16, yt, yt), dtype=np.float32)
    wsum = np.ones((16, yt, yt), np.float32)
    inner = LabelSink(
        (zn, yn, yn), classes, kind="logits", threshold=0.0, ignore_index=255, backend=ArrayBackend("cpu")
    )
    sink = ResampleSink(inner, ops, fuse=fuse)
    start = time.perf_counter()
    for z in range(0, zt, 8):
        n = min(8, zt - z)
        sink.take(slab[:, z % 8 : z % 8 + n], wsum[:n], z, n)
    sink.finalize()
    return time.perf_counter() - start, inner.labels, inner.confidence


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40, help="native rows Zn")
    parser.add_argument("--classes", type=int, default=105)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--kernel-threads", type=int, default=0, help="OpenMP threads of the native kernels (0: the OpenMP default)"
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["unfused", "fused"],
        choices=["unfused", "fused"],
        help="unfused: torch's bilinear then the label sink; fused: native.resample_finalize",
    )
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {p: [] for p in args.paths}
    outputs = {}
    for _ in range(args.repeats):  # interleaved, so both paths see the same machine
        for path in args.paths:
            with native.kernel_threads(args.kernel_threads or None):
                seconds, labels, confidence = run_once(args.classes, args.rows, args.threads, path == "fused")
            times[path].append(seconds)
            outputs[path] = (labels, confidence)
    for path, ts in times.items():
        print(
            f"{path}: {args.classes} classes, {args.rows} native rows 512x512 from 273x273: seconds "
            f"{[round(t, 3) for t in ts]}, median {np.median(ts) / args.rows * 1e3:.1f} ms per native row"
        )
    if len(outputs) == 2:
        (la, ca), (lb, cb) = outputs.values()
        same = bool(np.array_equal(la, lb) and np.array_equal(ca, cb))
        print(
            f"labels and confidence identical: {same}; speed-up (medians) "
            f"{np.median(times['unfused']) / np.median(times['fused']):.2f}x"
        )
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
