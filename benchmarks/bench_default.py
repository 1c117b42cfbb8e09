"""The default runtime against every fixed one: one volume per fresh process, as a user's run.

Issue 14 item 10 found ``--runtime auto`` 12x slower and 2.5x the memory of ``--runtime
onnxruntime`` on one 256^3 volume. This script times what a single-volume run costs a user:
each (model, volume, runtime) runs in a **fresh process** that builds the relabeler and labels
one synthetic CT volume; reported are the wall seconds of both (``total``), of the relabel
alone, and the process's peak RSS (imports included: what the user's machine must hold).
Runtimes alternate within each round, so a slow spell of the machine hits them all alike.

``--busy N`` starts N CPU-burning processes for the timed runs (a machine shared with other
jobs); ``--baseline DIR`` adds an ``auto`` row run with ``PYTHONPATH=DIR`` (an older checkout, to
compare before/after in one run).

Usage: python benchmarks/bench_default.py [--models unet3,demo] [--volumes small,256,ct]
       [--runtimes auto,openvino,onnxruntime,torch] [--rounds 2] [--busy 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

VOLUMES = {"small": (96, 128, 128), "256": (256, 256, 256), "ct": (200, 512, 512)}
MODELS = {
    # the bench/issue model: MONAI UNet 16-256, 2 residual units, 3 classes, 64^3 windows
    "unet3": {"net": "unet", "classes": 3, "window": (64, 64, 64)},
    # the demo's model (atso_fast.train.unet.UNet, 8 base channels, depth 3): many small windows
    "demo": {"net": "demo", "classes": 5, "window": (16, 32, 32)},
}


def export(model: str, folder: Path) -> Path:
    import atso_fast
    from atso_fast.bench.networks import CT_NORMALIZATION, builtin_network

    spec = MODELS[model]
    if spec["net"] == "demo":
        import torch

        from atso_fast.train.unet import UNet

        torch.manual_seed(0)
        net = UNet(1, spec["classes"], base_channels=8, depth=3).eval()
    else:
        net, _ = builtin_network(spec["classes"], net=spec["net"])
    return atso_fast.export_model(
        net, folder, window=spec["window"], num_classes=spec["classes"], normalization=CT_NORMALIZATION
    )


def child(package: str, runtime: str, shape: tuple[int, ...]) -> dict:
    """One user's run: build the relabeler, label one volume (in this fresh process)."""
    import atso_fast
    from atso_fast.datasets.synthetic import synthetic_ct

    volume = synthetic_ct(shape, 0)
    t0 = time.perf_counter()
    rel = atso_fast.Relabeler(package, runtime=runtime)
    t1 = time.perf_counter()
    res = rel.relabel_volume(volume)
    t2 = time.perf_counter()
    return {
        "runtime": runtime,
        "ran": rel.runtime_name,
        "build_s": t1 - t0,
        "relabel_s": t2 - t1,
        "total_s": t2 - t0,
        "peak_rss_mib": _peak_rss_mib(),
        "labels_sha1": hashlib.sha1(res.labels.tobytes()).hexdigest()[:12],
    }


def _peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: unlike ``ru_maxrss`` it does not inherit the parent's peak
    across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _burn(stop) -> None:  # noqa: ANN001 - a multiprocessing Event
    x = 0
    while not stop.is_set():
        for i in range(100000):
            x += i * i


def run_child(package: Path, runtime: str, shape: tuple[int, ...], pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, __file__, "--child", str(package), runtime, *map(str, shape)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/" if pythonpath else None)
    if out.returncode != 0:
        return {"runtime": runtime, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, work: Path) -> list[dict]:
    rows = []
    runtimes = [(r, None) for r in args.runtimes.split(",")]
    if args.baseline:
        runtimes.append(("auto", args.baseline))
    for model in args.models.split(","):
        package = export(model, work / model)
        for vol in args.volumes.split(","):
            results: dict[str, list[dict]] = {}
            for _ in range(args.rounds):
                for runtime, path in runtimes:
                    label = f"{runtime} (baseline)" if path else runtime
                    r = run_child(package, runtime, VOLUMES[vol], path)
                    results.setdefault(label, []).append(r)
                    print(f"{model} {vol} {label}: {r}", file=sys.stderr, flush=True)
            rows += [_summary(model, vol, label, rs) for label, rs in results.items()]
    return rows


def _summary(model: str, vol: str, label: str, rs: list[dict]) -> dict:
    ok = [r for r in rs if "error" not in r]
    if not ok:
        return {"model": model, "volume": vol, "runtime": label, "error": rs[0]["error"]}
    med = {k: statistics.median(r[k] for r in ok) for k in ("total_s", "relabel_s", "build_s", "peak_rss_mib")}
    return {
        "model": model,
        "volume": vol,
        "runtime": label,
        "ran": ok[0]["ran"],
        **med,
        "total_all": [r["total_s"] for r in ok],
        "labels_sha1": sorted({r["labels_sha1"] for r in ok}),
    }


def print_table(res: dict) -> None:
    print(
        f"# {res['machine']}, {res['date']}, busy processes {res['busy']}, load {res['load_before']} -> "
        f"{res['load_after']}; median of {res['rounds']} fresh-process runs"
    )
    print(
        f"{'model':<7}{'volume':<7}{'runtime':<18}{'ran':<13}{'total s':>9}{'relabel s':>10}{'build s':>8}"
        f"{'peak MiB':>9}{'vs best':>8}  every run"
    )
    for model, vol in dict.fromkeys((r["model"], r["volume"]) for r in res["rows"]):
        group = [r for r in res["rows"] if (r["model"], r["volume"]) == (model, vol) and "error" not in r]
        fixed = [r["total_s"] for r in group if not r["runtime"].startswith("auto")]
        best = min(fixed) if fixed else float("nan")
        for r in group:
            print(
                f"{model:<7}{vol:<7}{r['runtime']:<18}{r['ran']:<13}{r['total_s']:>9.2f}{r['relabel_s']:>10.2f}"
                f"{r['build_s']:>8.2f}{r['peak_rss_mib']:>9.0f}{r['total_s'] / best:>7.2f}x  "
                + ", ".join(f"{t:.2f}" for t in r["total_all"])
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="unet3,demo")
    ap.add_argument("--volumes", default="small,256,ct")
    ap.add_argument("--runtimes", default="auto,openvino,onnxruntime,torch")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--busy", type=int, default=0, help="CPU-burning processes during the runs")
    ap.add_argument("--baseline", help="also run auto with PYTHONPATH=this folder (an older checkout)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], tuple(int(v) for v in args.child[2:]))))
        return 0
    import platform

    stop = mp.Event()
    burners = [mp.Process(target=_burn, args=(stop,), daemon=True) for _ in range(args.busy)]
    load_before = open("/proc/loadavg").read().split()[:3]
    for p in burners:
        p.start()
    try:
        with tempfile.TemporaryDirectory(prefix="atso-bench-default-") as tmp:
            rows = measure(args, Path(tmp))
    finally:
        stop.set()
        for p in burners:
            p.join()
    res = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "busy": args.busy,
        "rounds": args.rounds,
        "load_before": " ".join(load_before),
        "load_after": " ".join(open("/proc/loadavg").read().split()[:3]),
        "rows": rows,
    }
    print_table(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
