"""Resampling the blended logits back to the scan's grid (``ResampleSink``), alone.

A 105-class slab on a 1.5 mm target grid (Zt x 273 x 273) goes back to 0.8 mm (Zn x 512 x 512),
order 1 on every axis, fed 8 target rows per call as the slab merger would, and finished by the
label sink (softmax, argmax, confidence). Reports seconds per native row (the export stage of
``bench_nnunet.py memory`` is this, times Zn, plus the write).

Usage:
    flock /work/bench.lock python benchmarks/bench_resample_back.py [--rows 40] [--classes 105]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from atso_fast.engine.merger import ArrayBackend, LabelSink
from atso_fast.engine.preprocess import axis_op
from atso_fast.engine.resample import ResampleSink

__all__ = ["main"]


def run_once(classes: int, zn: int, threads: int) -> tuple[float, int]:
    """Seconds to resample and finish ``zn`` native rows, and the label sum (a checksum)."""
    torch.set_num_threads(threads)
    zt, yt, yn = round(zn * 0.8 / 1.5), 273, 512
    ops = [axis_op(zt, zn, 1), axis_op(yt, yn, 1), axis_op(yt, yn, 1)]
    rng = np.random.default_rng(0)
    slab = rng.standard_normal((classes, 16, yt, yt), dtype=np.float32)
    wsum = np.ones((16, yt, yt), np.float32)
    inner = LabelSink((zn, yn, yn), classes, kind="logits", threshold=0.0, ignore_index=255,
                      backend=ArrayBackend("cpu"))
    sink = ResampleSink(inner, ops)
    start = time.perf_counter()
    for z in range(0, zt, 8):
        n = min(8, zt - z)
        sink.take(slab[:, z % 8:z % 8 + n], wsum[:n], z, n)
    sink.finalize()
    return time.perf_counter() - start, int(inner.labels.astype(np.int64).sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40, help="native rows Zn")
    parser.add_argument("--classes", type=int, default=105)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    times = []
    for _ in range(args.repeats):
        seconds, checksum = run_once(args.classes, args.rows, args.threads)
        times.append(seconds)
    print(f"{args.classes} classes, {args.rows} native rows 512x512 from 273x273: seconds "
          f"{[round(t, 2) for t in times]}, best {min(times) / args.rows * 1e3:.1f} ms per native row; "
          f"label checksum {checksum}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
