"""Native kernel throughput vs the PyTorch way of doing the same sum, and vs the machine's limit.

CPU: ``atso_fast.kernels.native.accumulate`` vs a MONAI-style PyTorch loop
(``acc[:, sl] += out[b] * imp; count[sl] += imp`` per window), at 3 and 32 classes, plus
``finalize`` and ``extract_patches``. The machine's streaming bandwidth (``b += a``: NumPy on one
thread, torch on the torch threads) is measured in the same run. ``accumulate`` is also stated
against its DRAM floor: every batch must read and write the accumulator and weight-sum voxels
its windows cover at least once (the patch batch is re-used by every call, as a network's output
would be fresh in cache), so ``floor_s = floor bytes / two-thread stream bandwidth`` and
``of_floor = floor_s / seconds``.
CUDA (``--device cuda``): the same kernels vs device-to-device ``b += a`` bandwidth and vs the
PyTorch loop on the GPU.

``--compare OLD [NEW]`` runs this script in alternating subprocesses with ``PYTHONPATH=OLD`` and
``PYTHONPATH=NEW`` (default: this checkout), ``--rounds`` times, and prints the medians and
ranges of both builds and the median of the per-round ratios (the script uses only the public
kernel API, so an older build runs it too).

Usage: python benchmarks/bench_kernels.py [--device cpu|cuda] [--classes 3 32] [--json out.json]
       python benchmarks/bench_kernels.py --compare /path/to/old/checkout --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]


def window_maths():
    """``(gaussian_importance, sliding_window_origins)`` of whichever atso_fast is on the path:
    ``--compare`` also runs builds from before the package moved them to ``atso_fast.engine``."""
    try:
        from atso_fast.engine.windows import gaussian_importance, sliding_window_origins
    except ImportError:
        from atso_fast.windows import gaussian_importance, sliding_window_origins
    return gaussian_importance, sliding_window_origins


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


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


def torch_accumulate(acc, count, patches, groups, imp):
    """MONAI's blending loop: one slice-add per window."""
    pz, py, px = imp.shape
    for origins in groups:
        for b, (z, y, x) in enumerate(origins):
            sl = (slice(z, z + pz), slice(y, y + py), slice(x, x + px))
            acc[(slice(None), *sl)] += patches[b] * imp
            count[sl] += imp


def covered_voxels(groups, shape, patch) -> int:
    """Sum over batches of the voxels the batch's windows cover (clipped to the volume)."""
    total = 0
    for origins in groups:
        mask = np.zeros(shape, bool)
        for z, y, x in origins:
            mask[max(z, 0) : z + patch[0], max(y, 0) : y + patch[1], max(x, 0) : x + patch[2]] = True
        total += int(mask.sum())
    return total


def accumulate_case(native, device: str, classes: int, shape, patch, batch: int):
    gaussian_importance, sliding_window_origins = window_maths()

    origins = sliding_window_origins(shape, patch, 0.5)
    groups = [origins[i : i + batch] for i in range(0, len(origins) - batch + 1, batch)]
    gen = torch.Generator().manual_seed(0)
    patches = torch.randn((batch, classes, *patch), generator=gen).to(device)
    imp = torch.from_numpy(gaussian_importance(patch).copy()).to(device)
    acc = torch.zeros((classes, *shape), device=device)
    wsum = torch.zeros(shape, device=device)
    host = device == "cpu"
    args = (acc.numpy(), wsum.numpy(), patches.numpy(), imp.numpy()) if host else (acc, wsum, patches, imp)

    def ours():
        for g in groups:
            native.accumulate(args[0], args[1], args[2], g, args[3], 0)

    def theirs():
        torch_accumulate(acc, wsum, patches, groups, imp)

    # correctness first: both ways from zero must agree
    ours()
    ref_acc, ref_w = acc.clone(), wsum.clone()
    acc.zero_(), wsum.zero_()
    theirs()
    torch.testing.assert_close(acc, ref_acc, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(wsum, ref_w, rtol=1e-4, atol=1e-4)
    floor_bytes = covered_voxels(groups, shape, patch) * (classes * 4 + 4) * 2  # read + write once
    return len(groups) * batch, floor_bytes, ours, theirs


def stream_bandwidth(device: str, n: int, repeats: int) -> dict:
    """Bytes/s of ``b += a`` (read a, read b, write b): NumPy (one thread) and torch (its threads)."""
    if device == "cpu":
        a, b = np.ones(n, np.float32), np.ones(n, np.float32)
        ta, tb = torch.ones(n), torch.ones(n)
        sec, _ = timed_interleaved(
            {"numpy": lambda: np.add(b, a, out=b), "torch": lambda: tb.add_(ta)}, device, repeats
        )
    else:
        ta, tb = torch.ones(n, device=device), torch.ones(n, device=device)
        sec, _ = timed_interleaved({"torch": lambda: tb.add_(ta)}, device, repeats)
    return {name: 3 * 4 * n / s for name, s in sec.items()}


def accumulate_row(native, device, classes, shape, patch, batch, repeats, bw) -> dict:
    windows, floor_bytes, ours, theirs = accumulate_case(native, device, classes, shape, patch, batch)
    sec, _ = timed_interleaved({"ours": ours, "torch": theirs}, device, repeats)
    floor_s = floor_bytes / bw
    return {
        "kernel": "accumulate",
        "classes": classes,
        "windows": windows,
        "seconds": sec["ours"],
        "torch_seconds": sec["torch"],
        "speedup_vs_torch": sec["torch"] / sec["ours"],
        "floor_GB": floor_bytes / 1e9,
        "floor_seconds": floor_s,
        "of_floor": floor_s / sec["ours"],
    }


def finalize_row(native, device: str, classes: int, shape, repeats: int) -> dict:
    acc = torch.randn((classes, *shape), device=device)
    wsum = torch.rand(shape, device=device) + 0.5
    a, w = (acc.numpy(), wsum.numpy()) if device == "cpu" else (acc, wsum)
    sec, _ = timed_interleaved({"ours": lambda: native.finalize(a, w, 0.5, 255, "logits")}, device, repeats)
    nbytes = acc.numel() * 4 + wsum.numel() * 4 + 2 * wsum.numel()
    return {"kernel": "finalize", "classes": classes, "seconds": sec["ours"], "GB/s": nbytes / sec["ours"] / 1e9}


def extract_row(native, device: str, shape, patch, repeats: int) -> dict:
    _, sliding_window_origins = window_maths()

    volume = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    vol = volume.numpy() if device == "cpu" else volume
    origins = sliding_window_origins(shape, patch, 0.5)
    sec, out = timed_interleaved({"ours": lambda: native.extract_patches(vol, origins, patch)}, device, repeats)
    nbytes = 2 * out["ours"].numel() * 4 if device == "cuda" else 2 * out["ours"].nbytes
    return {
        "kernel": "extract_patches",
        "classes": 1,
        "windows": len(origins),
        "seconds": sec["ours"],
        "GB/s": nbytes / sec["ours"] / 1e9,
    }


def run(device: str, classes_list, shape, patch, batch: int, repeats: int) -> dict:
    native = _native()
    bw = stream_bandwidth(device, 64 * 2**20, repeats)
    bw2 = bw["torch"]
    rows = [extract_row(native, device, shape, patch, repeats)]
    for classes in classes_list:
        rows.append(accumulate_row(native, device, classes, shape, patch, batch, repeats, bw2))
        rows.append(finalize_row(native, device, classes, shape, repeats))
    return {
        "device": device,
        "machine": machine(device),
        "date": time.strftime("%Y-%m-%d"),
        "load_avg": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "stream_GB/s": {k: v / 1e9 for k, v in bw.items()},
        "shape": list(shape),
        "patch": list(patch),
        "batch": batch,
        "rows": rows,
        "build": native.build_info(),
        "module": sys.modules["atso_fast._C"].__file__,
    }


def machine(device: str) -> str:
    """GPU name, or CPU architecture, cores and torch threads."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {len(os.sched_getaffinity(0))} cores, torch threads {torch.get_num_threads()}"


def print_table(res: dict) -> None:
    bw = ", ".join(f"{k} {v:.1f} GB/s" for k, v in res["stream_GB/s"].items())
    print(
        f"# {res['machine']} ({res['device']}), {res['date']}, load {res['load_avg']:.2f}; stream b+=a: {bw}; "
        f"volume {res['shape']}, window {res['patch']}, batch {res['batch']}"
    )
    print(f"{'kernel':<16}{'C':>5}{'ours s':>10}{'torch s':>10}{'speedup':>9}{'floor s':>9}{'of floor':>9}")
    nan = float("nan")
    for r in res["rows"]:
        print(
            f"{r['kernel']:<16}{r['classes']:>5}{r['seconds']:>10.4f}{r.get('torch_seconds', nan):>10.4f}"
            f"{r.get('speedup_vs_torch', nan):>9.2f}{r.get('floor_seconds', nan):>9.4f}"
            f"{r.get('of_floor', nan):>9.0%}"
        )


# ----------------------------------------------------------------------------- old vs new
def one_run(pythonpath: str, args: list[str]) -> dict:
    """This script in a subprocess with ``PYTHONPATH=pythonpath``; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "res.json"
        env = dict(os.environ, PYTHONPATH=pythonpath)
        subprocess.run(
            [sys.executable, __file__, *args, "--json", str(out)], env=env, check=True, stdout=subprocess.DEVNULL
        )
        return json.loads(out.read_text())


def compare(old: str, new: str, rounds: int, args: list[str]) -> dict:
    """Alternating subprocess rounds of both builds (order flipped every round)."""
    runs: dict = {"old": [], "new": []}
    for r in range(rounds):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            runs[name].append(one_run(old if name == "old" else new, args))
    return runs


def print_comparison(runs: dict) -> None:
    first = runs["new"][0]
    loads = [r["load_avg"] for rs in runs.values() for r in rs]
    print(
        f"# {first['machine']}, {first['date']}, {len(runs['new'])} alternating rounds, load {min(loads):.2f}-"
        f"{max(loads):.2f}; old {runs['old'][0]['module']}, new {first['module']}"
    )
    bw2 = [r["stream_GB/s"].get("torch") for rs in runs.values() for r in rs]
    print(f"# two-thread stream b+=a {min(bw2):.1f}-{max(bw2):.1f} GB/s")
    print(f"{'kernel':<16}{'C':>5}{'old s (min-max)':>26}{'new s (min-max)':>26}{'new/old':>9}{'new of floor':>16}")
    for i, row in enumerate(first["rows"]):
        old = [r["rows"][i]["seconds"] for r in runs["old"]]
        new = [r["rows"][i]["seconds"] for r in runs["new"]]
        ratio = statistics.median(n / o for n, o in zip(new, old))
        floor = ""
        if "of_floor" in row:
            fr = [r["rows"][i]["of_floor"] for r in runs["new"]]
            floor = f"{statistics.median(fr):.0%} ({min(fr):.0%}-{max(fr):.0%})"
        print(f"{row['kernel']:<16}{row['classes']:>5}{_span(old):>26}{_span(new):>26}{ratio:>9.2f}{floor:>16}")


def _span(ts: list[float]) -> str:
    return f"{statistics.median(ts):.4f} ({min(ts):.4f}-{max(ts):.4f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--classes", type=int, nargs="+", default=[3, 32])
    ap.add_argument("--shape", type=int, nargs=3, default=None)
    ap.add_argument("--patch", type=int, nargs=3, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write results to this file")
    ap.add_argument("--compare", nargs="+", metavar="PYTHONPATH", help="OLD [NEW] checkouts to compare")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of --compare")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not _native().has_cuda():
        raise SystemExit(f"--device cuda needs a GPU and a CUDA build: {_native().build_info()}")
    shape = tuple(args.shape or ((200, 512, 512) if args.device == "cuda" else (96, 160, 160)))
    patch = tuple(args.patch or ((96, 96, 96) if args.device == "cuda" else (48, 64, 64)))
    if args.compare:
        sub = [
            "--device",
            args.device,
            "--classes",
            *map(str, args.classes),
            "--shape",
            *map(str, shape),
            "--patch",
            *map(str, patch),
            "--batch",
            str(args.batch),
            "--repeats",
            str(args.repeats),
        ]
        new = args.compare[1] if len(args.compare) > 1 else str(REPO)
        res = compare(args.compare[0], new, args.rounds, sub)
        print_comparison(res)
    else:
        res = run(args.device, args.classes, shape, patch, args.batch, args.repeats)
        print_table(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def _native():
    from atso_fast.kernels import native

    return native


if __name__ == "__main__":
    raise SystemExit(main())
