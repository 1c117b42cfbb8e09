"""Time and peak memory vs volume size and vs classes: atso_fast vs MONAI, JSON + PNG charts.

Memory: every (shape, classes, method) point runs once, cold, in its own subprocess, and
reports ``ru_maxrss`` after the run minus ``ru_maxrss`` before it, taken once the imports, the
network and the input volume exist, with the peak reset to the current RSS there
(``/proc/self/clear_refs``, Linux) so earlier transient peaks do not hide part of the run's:
torch CPU tensors and ONNX Runtime buffers do not show in ``tracemalloc``, resident memory
does. On CUDA it also reports the peak of ``torch.cuda.max_memory_allocated`` over the run minus
what was allocated before (the torch allocator only).

Time: one more subprocess per point runs both methods ``--repeats`` times, interleaved run by
run after a small warm-up, so load from other processes on a shared machine hits both alike;
the median is plotted, the minimum is kept in the JSON too.

Both methods run the same seeded built-in network (``atso_fast.bench.networks.builtin_network``) on the
same synthetic CT phantom. ``--runtime torch`` (default) gives atso_fast the very same torch
module (``Relabeler.from_module``), so the two differ only in windowing, blending and
finalisation; ``--runtime onnxruntime|auto|tensorrt`` exports a package first. Labels of the two
methods are compared at every point.

Run from the repository root::

    python benchmarks/scaling.py                                  # CPU defaults (~15 min on 2 cores)
    python benchmarks/scaling.py --sizes 64,64,64 96,128,128 --classes-list 2 8 --repeats 1
    python benchmarks/scaling.py --device cuda                    # up to 400x512x512, 2..128 classes

Writes ``benchmarks/results/scaling_<device>.json``, ``scaling_<device>_size.png`` and
``scaling_<device>_classes.png`` (``--out-dir`` to change the folder).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["build_parser", "main", "measure_point", "parse_shape", "plot", "run_child", "time_point"]

REPO = Path(__file__).resolve().parents[1]
METHODS = ("atso_fast", "monai")
DEFAULTS = {
    "cpu": {
        "sizes": ["64,64,64", "96,128,128", "128,192,192", "160,256,256"],
        "class_shape": "160,96,96",
        "classes": [2, 8, 32, 128],
        "window": "64,64,64",
    },
    "cuda": {
        "sizes": ["64,64,64", "128,128,128", "128,256,256", "200,512,512", "400,512,512"],
        "class_shape": "200,512,512",
        "classes": [2, 8, 32, 105, 128],
        "window": "96,96,96",
    },
}


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"Z,Y,X"`` (or ``ZxYxX``) -> a tuple of three positive ints.

    Raises:
        ValueError: naming the text received.
    """
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"a shape must be three positive integers Z,Y,X, got {text!r}")
    return shape  # type: ignore[return-value]


# ------------------------------------------------------------------------------ child side
def _runner(spec: dict[str, Any], net: Any) -> Any:
    """``volume -> labels`` for ``spec["method"]``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from monai_baseline import monai_labels

    from atso_fast.bench.networks import CT_NORMALIZATION

    if spec["method"] == "monai":
        return lambda vol: monai_labels(
            net, vol, window=spec["window"], batch=spec["batch"], overlap=spec["overlap"], device=spec["device"]
        )
    from atso_fast.engine.relabeler import Relabeler

    kw = {
        "device": spec["device"],
        "overlap": spec["overlap"],
        "batch_size": spec["batch"],
        "accumulate_dtype": spec["accumulate_dtype"],
    }
    if spec["runtime"] == "torch":
        rel = Relabeler.from_module(
            net, window=spec["window"], num_classes=spec["classes"], normalization=CT_NORMALIZATION, **kw
        )
    else:
        rel = Relabeler(spec["model_dir"], runtime=spec["runtime"], **kw)
    return lambda vol: rel.relabel_volume(vol).labels


def measure_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one method at one point: one cold run in this process; saves its labels."""
    from atso_fast.bench.memory import maxrss_mib, reset_peak_rss
    from atso_fast.bench.networks import builtin_network
    from atso_fast.bench.runner import Device
    from atso_fast.datasets.synthetic import synthetic_ct

    net, _ = builtin_network(spec["classes"], net=spec["net"], seed=spec["seed"])
    run = _runner(spec, net.to(spec["device"]))
    volume = synthetic_ct(tuple(spec["shape"]), spec["seed"])
    dev = Device(spec["device"])
    gc.collect()
    dev.reset_peak()
    dev_base = dev.torch.cuda.memory_allocated(spec["device"]) / 2**20 if dev.torch else 0.0
    reset = reset_peak_rss()  # forget the peaks of imports and of building the volume
    base = maxrss_mib()
    start = time.perf_counter()
    labels = run(volume)
    cold = time.perf_counter() - start
    host = maxrss_mib() - base
    dev_peak = dev.peak_mib()
    np.save(spec["labels_path"], labels)
    return {
        "method": spec["method"],
        "peak_host_mib": host,
        "baseline_host_mib": base,
        "peak_reset": reset,
        "cold_seconds": cold,
        "device_peak_mib": None if dev_peak is None else dev_peak - dev_base,
    }


def time_point(spec: dict[str, Any]) -> dict[str, list[float]]:
    """Seconds of both methods at one point, interleaved run by run in this process, so that
    load from other processes hits both alike; one warm-up on a window-sized volume first."""
    from atso_fast.bench.networks import builtin_network
    from atso_fast.bench.runner import Device, time_repeats
    from atso_fast.datasets.synthetic import synthetic_ct

    net, _ = builtin_network(spec["classes"], net=spec["net"], seed=spec["seed"])
    net = net.to(spec["device"])
    runs = {m: _runner({**spec, "method": m}, net) for m in METHODS}
    dev = Device(spec["device"])
    small, volume = synthetic_ct(tuple(spec["window"]), spec["seed"]), synthetic_ct(tuple(spec["shape"]), spec["seed"])
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for m in METHODS:
        runs[m](small)
    for _ in range(spec["repeats"]):
        for m in METHODS:
            times[m] += time_repeats(lambda m=m: runs[m](volume), 1, dev)
    return times


def run_child(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run :func:`measure_point` in a fresh interpreter; its last stdout line is the JSON result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"point {spec['method']} {spec['shape']} C={spec['classes']} failed "
            f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ parent side
def _point_pair(
    args: argparse.Namespace, shape: tuple[int, int, int], classes: int, model_dir: str | None, scratch: Path
) -> list[dict[str, Any]]:
    """Both methods at one point: a memory child each, then one interleaved timing child."""
    spec = {
        "shape": list(shape),
        "classes": classes,
        "window": list(args.window),
        "overlap": args.overlap,
        "batch": args.batch,
        "device": args.device,
        "runtime": args.runtime,
        "net": args.net,
        "accumulate_dtype": args.accumulate_dtype,
        "model_dir": model_dir,
        "seed": args.seed,
        "repeats": args.repeats,
    }
    rows = [run_child({**spec, "method": m, "labels_path": str(scratch / f"{m}.npy")}, args.timeout) for m in METHODS]
    times = run_child({**spec, "method": "timing"}, args.timeout)
    agreement = float(np.mean(np.load(scratch / f"{METHODS[0]}.npy") == np.load(scratch / f"{METHODS[1]}.npy")))
    for row in rows:
        t = times[row["method"]]
        row.update(
            shape=list(shape),
            classes=classes,
            seconds=statistics.median(t),
            seconds_min=min(t),
            seconds_all=t,
            agreement=agreement,
        )
    _progress(rows)
    return rows


def _progress(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        dev = "" if r["device_peak_mib"] is None else f", GPU +{r['device_peak_mib']:.0f} MiB"
        print(
            f"  {r['method']:<9} {'x'.join(map(str, r['shape'])):>12} C={r['classes']:<4} {r['seconds']:8.3f} s "
            f"(min {r['seconds_min']:.3f}), "
            f"host +{r['peak_host_mib']:.0f} MiB{dev}, agreement {r['agreement']:.6f}",
            file=sys.stderr,
            flush=True,
        )


def _model_dirs(args: argparse.Namespace, classes: set[int], scratch: Path) -> dict[int, str | None]:
    """An exported package per class count, only for runtimes that need one."""
    if args.runtime == "torch":
        return {c: None for c in classes}
    from atso_fast.bench.networks import export_builtin

    return {
        c: str(
            export_builtin(scratch / f"model_c{c}", window=tuple(args.window), classes=c, net=args.net, seed=args.seed)[
                0
            ]
        )
        for c in sorted(classes)
    }


def _sweep(args: argparse.Namespace, scratch: Path) -> dict[str, list[dict[str, Any]]]:
    sizes = [] if args.skip_size else [parse_shape(s) for s in args.sizes]
    classes = [] if args.skip_classes else list(args.classes_list)
    models = _model_dirs(args, set(classes) | ({args.classes} if sizes else set()), scratch)
    out: dict[str, list[dict[str, Any]]] = {"size": [], "classes": []}
    for shape in sizes:
        out["size"] += _point_pair(args, shape, args.classes, models[args.classes], scratch)
    for c in classes:
        out["classes"] += _point_pair(args, parse_shape(args.class_shape), c, models[c], scratch)
    return out


def _series(rows: list[dict[str, Any]], method: str, xkey: Any, ykey: str) -> tuple[list, list]:
    pts = sorted((xkey(r), r[ykey]) for r in rows if r["method"] == method and r[ykey] is not None)
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(rows: list[dict[str, Any]], xkey: Any, xlabel: str, title: str, path: Path, log2x: bool = False) -> None:
    """Two panels (seconds, peak memory) with one line per method, saved as a PNG (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem_key = "device_peak_mib" if any(r["device_peak_mib"] is not None for r in rows) else "peak_host_mib"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, ylabel in (
        (axes[0], "seconds", "seconds per volume"),
        (axes[1], mem_key, "peak memory over baseline (MiB)"),
    ):
        for method in METHODS:
            xs, ys = _series(rows, method, xkey, key)
            ax.plot(xs, ys, marker="o", label=method)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel + (" (GPU)" if key == "device_peak_mib" else ""))
        ax.grid(alpha=0.3)
        if log2x:
            ax.set_xscale("log", base=2)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> list[Path]:
    import torch

    args.out_dir.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    info = {"cpu_count": os.cpu_count(), "torch": torch.__version__}
    if tag == "cuda":
        info["device_name"] = torch.cuda.get_device_name(torch.device(args.device))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"}
    json_path = args.out_dir / f"scaling_{tag}.json"
    json_path.write_text(json.dumps({"machine": info, "config": config, **results}, indent=1) + "\n")
    written = [json_path]
    what = f"{args.runtime} runtime, window {'x'.join(map(str, args.window))}, {tag}"
    if results["size"]:
        written.append(args.out_dir / f"scaling_{tag}_size.png")
        plot(
            results["size"],
            lambda r: float(np.prod(r["shape"])) / 1e6,
            "megavoxels",
            f"vs volume size ({args.classes} classes; {what})",
            written[-1],
        )
    if results["classes"]:
        written.append(args.out_dir / f"scaling_{tag}_classes.png")
        plot(
            results["classes"],
            lambda r: r["classes"],
            "classes",
            f"vs classes ({args.class_shape}; {what})",
            written[-1],
            log2x=True,
        )
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--sizes", nargs="+", help="volume shapes Z,Y,X for the size sweep")
    p.add_argument("--classes", type=int, default=3, help="classes of the size sweep")
    p.add_argument("--class-shape", help="volume shape Z,Y,X of the classes sweep")
    p.add_argument("--classes-list", type=int, nargs="+", help="class counts of the classes sweep")
    p.add_argument("--window", help="window Z,Y,X (default 64^3 cpu, 96^3 cuda)")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument(
        "--runtime",
        default="torch",
        choices=["torch", "auto", "onnxruntime", "tensorrt"],
        help="atso_fast runtime (torch: the very module MONAI runs)",
    )
    p.add_argument("--accumulate-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--net", default="auto", choices=["auto", "unet", "convnet"])
    p.add_argument("--repeats", type=int, default=2, help="timed runs per method, interleaved (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-size", action="store_true")
    p.add_argument("--skip-classes", action="store_true")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def _finish_args(args: argparse.Namespace) -> argparse.Namespace:
    d = DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    args.sizes = args.sizes or d["sizes"]
    args.class_shape = args.class_shape or d["class_shape"]
    args.classes_list = args.classes_list or d["classes"]
    args.window = parse_shape(args.window or d["window"])
    for s in [*args.sizes, args.class_shape]:
        parse_shape(s)
    if min([args.classes, *args.classes_list, args.batch, args.repeats]) < 1:
        raise ValueError(
            f"--classes, --classes-list, --batch and --repeats must be >= 1, got {args.classes}, "
            f"{args.classes_list}, {args.batch}, {args.repeats}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    """Run both sweeps (or one child point with ``--child``); 2 on bad options."""
    args = build_parser().parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(time_point(spec) if spec["method"] == "timing" else measure_point(spec)))
        return 0
    try:
        args = _finish_args(args)
    except ValueError as exc:
        print(f"scaling: error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="atso-scaling-") as scratch:
        results = _sweep(args, Path(scratch))
    for path in _write(args, results):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
