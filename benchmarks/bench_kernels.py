"""Native kernel throughput vs the PyTorch way of doing the same sum, measured in one run.

CPU: ``atso_fast.native.accumulate`` vs a MONAI-style PyTorch loop
(``acc[:, sl] += out[b] * imp; count[sl] += imp`` per window), at 3 and 32 classes, plus the
machine's streaming bandwidth (NumPy ``b += a``) to express our kernel as a fraction of it.
CUDA (``--device cuda``): accumulate + finalize vs device-to-device copy bandwidth and vs the
same PyTorch loop on the GPU.

Usage: python benchmarks/bench_kernels.py [--device cpu|cuda] [--classes 3 32] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from atso_fast.kernels import native
from atso_fast.engine.windows import gaussian_importance, sliding_window_origins

__all__ = ["main"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int):
    """(median seconds, last result) of ``fn()`` after one warm-up call."""
    out = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def timed_interleaved(fns: dict, device: str, repeats: int) -> tuple[dict, dict]:
    """Median seconds and last result of each ``fns[name]()``, timed in alternating rounds.

    Every method runs once per round, so a slow spell of the machine (another job, clock
    changes) hits all of them alike instead of whichever was running at the time.
    """
    outs = {name: fn() for name, fn in fns.items()}  # warm-up
    sync(device)
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            outs[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}, outs


def torch_accumulate(acc, count, patches, origins, imp, repeat: int):
    """MONAI's blending loop: one slice-add per window."""
    pz, py, px = imp.shape
    for r in range(repeat):
        for b, (z, y, x) in enumerate(origins[r]):
            sl = (slice(z, z + pz), slice(y, y + py), slice(x, x + px))
            acc[(slice(None), *sl)] += patches[b] * imp
            count[sl] += imp


def case(device: str, classes: int, shape, patch, batch: int):
    origins = sliding_window_origins(shape, patch, 0.5)
    groups = [origins[i:i + batch] for i in range(0, len(origins) - batch + 1, batch)]
    gen = torch.Generator().manual_seed(0)
    patches = torch.randn((batch, classes, *patch), generator=gen).to(device)
    imp = torch.from_numpy(gaussian_importance(patch).copy()).to(device)
    host = device == "cpu"
    acc = torch.zeros((classes, *shape), device=device)
    wsum = torch.zeros(shape, device=device)
    args = (acc.numpy(), wsum.numpy(), patches.numpy(), imp.numpy()) if host else (acc, wsum, patches, imp)

    def ours():
        for g in groups:
            native.accumulate(args[0], args[1], args[2], g, args[3], 0)

    def theirs():
        torch_accumulate(acc, wsum, patches, [g for g in groups], imp, len(groups))

    # correctness first: both ways from zero must agree
    ours()
    ref_acc, ref_w = acc.clone(), wsum.clone()
    acc.zero_(), wsum.zero_()
    theirs()
    torch.testing.assert_close(acc, ref_acc, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(wsum, ref_w, rtol=1e-4, atol=1e-4)
    windows = len(groups) * batch
    win_n = int(np.prod(patch))
    # bytes a window moves at least once: acc read+write, patch read, wsum read+write, importance read
    nbytes = windows * win_n * (classes * (4 + 4 + 4) + 4 + 4 + 4)
    return windows, nbytes, ours, theirs, (acc, wsum)


def stream_bandwidth(device: str, n: int, repeats: int) -> float:
    """Bytes/s of ``b += a`` (read a, read b, write b)."""
    if device == "cpu":
        a, b = np.ones(n, np.float32), np.ones(n, np.float32)
        sec, _ = timed(lambda: np.add(b, a, out=b), device, repeats)
    else:
        a, b = torch.ones(n, device=device), torch.ones(n, device=device)
        sec, _ = timed(lambda: b.add_(a), device, repeats)
    return 3 * 4 * n / sec


def finalize_row(device: str, classes: int, shape, repeats: int, copy_bw: float) -> dict:
    acc = torch.randn((classes, *shape), device=device)
    wsum = torch.rand(shape, device=device) + 0.5
    a, w = (acc.numpy(), wsum.numpy()) if device == "cpu" else (acc, wsum)
    sec, _ = timed(lambda: native.finalize(a, w, 0.5, 255, "logits"), device, repeats)
    nbytes = acc.numel() * 4 + wsum.numel() * 4 + 2 * wsum.numel()
    return {"kernel": "finalize", "classes": classes, "seconds": sec, "GB/s": nbytes / sec / 1e9,
            "fraction_of_stream": nbytes / sec / copy_bw}


def run(device: str, classes_list, shape, patch, batch: int, repeats: int) -> dict:
    bw = stream_bandwidth(device, 64 * 2**20, repeats)
    rows = []
    for classes in classes_list:
        windows, nbytes, ours, theirs, _ = case(device, classes, shape, patch, batch)
        t_ours, t_theirs = timed(ours, device, repeats)[0], timed(theirs, device, repeats)[0]
        rows.append({"kernel": "accumulate", "classes": classes, "windows": windows, "seconds": t_ours,
                     "torch_seconds": t_theirs, "speedup_vs_torch": t_theirs / t_ours,
                     "GB/s": nbytes / t_ours / 1e9, "fraction_of_stream": nbytes / t_ours / bw})
        rows.append(finalize_row(device, classes, shape, repeats, bw))
    return {"device": device, "machine": machine(device), "date": time.strftime("%Y-%m-%d"),
            "threads": torch.get_num_threads(), "stream_GB/s": bw / 1e9, "shape": list(shape),
            "patch": list(patch), "batch": batch, "rows": rows, "build": native.build_info()}


def machine(device: str) -> str:
    """GPU name, or CPU architecture, cores and torch threads."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {len(os.sched_getaffinity(0))} cores, torch threads {torch.get_num_threads()}"


def print_table(res: dict) -> None:
    print(f"# {res['machine']} ({res['device']}), {res['date']}; stream b+=a {res['stream_GB/s']:.1f} GB/s; "
          f"volume {res['shape']}, window {res['patch']}, batch {res['batch']}")
    print(f"{'kernel':<11}{'C':>5}{'ours s':>10}{'torch s':>10}{'speedup':>9}{'GB/s':>8}{'of stream':>10}")
    for r in res["rows"]:
        t = r.get("torch_seconds")
        sp = r.get("speedup_vs_torch")
        print(f"{r['kernel']:<11}{r['classes']:>5}{r['seconds']:>10.4f}{t if t else float('nan'):>10.4f}"
              f"{sp if sp else float('nan'):>9.2f}{r['GB/s']:>8.2f}{r['fraction_of_stream']:>10.0%}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--classes", type=int, nargs="+", default=[3, 32])
    ap.add_argument("--shape", type=int, nargs=3, default=None)
    ap.add_argument("--patch", type=int, nargs=3, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write results to this file")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not native.has_cuda():
        raise SystemExit(f"--device cuda needs a GPU and a CUDA build: {native.build_info()}")
    shape = tuple(args.shape or ((200, 512, 512) if args.device == "cuda" else (96, 160, 160)))
    patch = tuple(args.patch or ((96, 96, 96) if args.device == "cuda" else (48, 64, 64)))
    res = run(args.device, args.classes, shape, patch, args.batch, args.repeats)
    print_table(res)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
