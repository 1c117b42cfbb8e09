"""Relabel pass side by side, in one run: MONAI ``sliding_window_inference`` vs atso-fast's
runtimes vs the network alone on the same windows; then peak memory at many classes.

Part A (speed): MONAI UNet 16-32-64-128-256 (2 res units), same weights for everyone, gaussian
blending, overlap 0.5. Reports seconds per volume, voxels/s, our stitching+thresholding overhead
relative to the network alone (same runtime, same windows), the end-to-end ratio MONAI / ours,
and label agreement with MONAI.
Part B (memory): peak memory of the blending at many classes, each method in a fresh
subprocess (CPU: peak RSS growth; CUDA: torch.cuda.max_memory_allocated). A one-layer conv
head stands in for the network there so the numbers isolate stitching memory (same head for
MONAI and us).

OpenVINO rows run with the runtime's defaults (dynamic batch, even batches, one stream, two
batches in flight for outputs up to 256 MiB: stitching overlapped with the network);
``openvino-s2`` two streams and three in flight (the default for small outputs until issue 13's
third pass); ``openvino-seq`` one stream with one batch in flight, to show what the overlap saves;
``openvino-old`` the settings before issue 13's second pass (static batch, short batches padded,
one stream, two batches in flight for small outputs, else one).
Part C (``--streams-memory``): peak RSS of a whole relabel pass with the MONAI UNet, OpenVINO
with one stream (two in flight) vs two streams (three in flight), each in a fresh subprocess.

Usage: python benchmarks/bench_relabel.py [--device cpu|cuda] [--classes 3 105] [--json out.json]
       [--only onnxruntime:float32,openvino:bfloat16,...]   (a subset of atso-fast rows; MONAI always runs)
       [--streams-memory]   (part C at --memory-classes x --memory-batches)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from bench_kernels import (  # benchmarks/ is on sys.path for scripts
    machine,
    sync,
    timed_interleaved,
)

import atso_fast
from atso_fast.bench.memory import peak_rss_mib, reset_peak_rss
from atso_fast.bench.networks import builtin_network
from atso_fast.bench.runner import run_batches
from atso_fast.kernels import native

__all__ = ["main"]

CPU_DEFAULTS = {
    "shape": (96, 128, 128),
    "window": (64, 64, 64),
    "batch": 4,
    "mem_shape": (200, 256, 256),
    "mem_window": (64, 64, 64),
}
GPU_DEFAULTS = {
    "shape": (200, 512, 512),
    "window": (96, 96, 96),
    "batch": 16,
    "mem_shape": (200, 512, 512),
    "mem_window": (96, 96, 96),
}


def head(classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv3d(1, classes, 3, padding=1).eval()


def monai_labels(net, volume, window, batch, device, autocast=None):
    """MONAI's sliding window (fp32, or under ``torch.autocast`` with dtype ``autocast``)."""
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(volume)[None, None].to(device)
    with torch.inference_mode(), torch.autocast(device, enabled=autocast is not None, dtype=autocast):
        logits = sliding_window_inference(x, window, batch, net, overlap=0.5, mode="gaussian", sigma_scale=0.125)
    return logits[0].argmax(0).to(torch.uint8).cpu().numpy()


def network_alone(runtime, volume, window, batch, device):
    """The runtime on exactly the windows and batches the relabel pass runs, extracted beforehand
    (near-equal batches for a runtime with a dynamic batch, else MONAI's)."""
    from atso_fast.engine.windows import batch_bounds, sliding_window_origins

    origins = sliding_window_origins(volume.shape, window, 0.5)
    bounds = batch_bounds(len(origins), batch, even=runtime.dynamic_batch)
    vol = torch.from_numpy(volume)[None].to(device) if device == "cuda" else volume[None]
    batches = [native.extract_patches(vol, origins[lo:hi], window) for lo, hi in bounds]
    return lambda: run_batches(runtime, batches)  # as many in flight as the relabel pass


def speed_rows(classes: int, args, cfg) -> list[dict]:
    """Every method timed in alternating rounds (``timed_interleaved``) on one volume."""
    device, window, batch = args.device, cfg["window"], cfg["batch"]
    net = builtin_network(classes, net="unet")[0].to(device)  # MONAI UNet 16-256, seed 0
    volume = np.random.default_rng(0).standard_normal(cfg["shape"]).astype(np.float32)
    low = torch.float16 if device == "cuda" else torch.bfloat16
    fns = {"monai fp32": lambda: monai_labels(net, volume, window, batch, device)}
    if device == "cuda" or cpu_has_bf16():  # else torch emulates bf16, 50x slower: no baseline
        fns[f"monai autocast {str(low)[6:]}"] = lambda: monai_labels(net, volume, window, batch, device, low)
    ours = []
    with tempfile.TemporaryDirectory() as tmp:
        pkg = atso_fast.export_model(net.cpu(), tmp, window=window, num_classes=classes, save_torch=False)
        net.to(device)
        for name, precision, compile in runtimes_for(device, args.only):
            rel = make_relabeler(name, pkg, net, window, classes, device, batch, precision, compile=compile)
            method = f"atso-fast {name}{' compiled' if compile else ''} {precision}"
            fns[method] = lambda rel=rel: rel.relabel_volume(volume, normalized=True).labels
            fns[method + " net"] = network_alone(rel.runtime, volume, window, batch, device)
            ours.append(method)
        secs, outs = timed_interleaved(fns, device, args.repeats)
    ref, t_monai = outs["monai fp32"], secs["monai fp32"]
    rows = []
    for method in [m for m in fns if not m.endswith(" net")]:
        row = {
            "method": method,
            "classes": classes,
            "seconds": secs[method],
            "agreement": float((outs[method] == ref).mean()),
        }
        if method in ours:
            t_net = secs[method + " net"]
            row.update(network_alone_seconds=t_net, overhead=(secs[method] - t_net) / t_net)
        row["voxels_per_s"] = volume.size / row["seconds"]
        row["speedup_vs_monai_fp32"] = t_monai / row["seconds"]
        rows.append(row)
    return rows


def cpu_has_bf16() -> bool:
    """True when the CPU lists bfloat16 instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def runtimes_for(device: str, only: str | None = None) -> list[tuple[str, str, bool]]:
    """(runtime, precision, torch.compile) rows; compile time falls in the untimed warm-up.

    ``only``: comma list of ``runtime:precision`` (``torch-compiled:float32``, ``openvino-seq:float32``,
    ``openvino-old:bfloat16``)."""
    from atso_fast.runtimes import available_runtimes

    have = available_runtimes(device)
    if device == "cpu":
        out = [("onnxruntime", "float32", False), ("torch", "float32", False), ("torch", "float32", True)]
        out += [("torch", "bfloat16", False)] if cpu_has_bf16() else []  # emulated bf16: no contest
        if "openvino" in have:
            from atso_fast.runtimes import openvino_supports

            out += [
                ("openvino", "float32", False),
                ("openvino-s2", "float32", False),
                ("openvino-seq", "float32", False),
                ("openvino-old", "float32", False),
            ]
            if openvino_supports("bfloat16"):
                out += [
                    ("openvino", "bfloat16", False),
                    ("openvino-s2", "bfloat16", False),
                    ("openvino-old", "bfloat16", False),
                ]
    else:
        out = [("torch", "float32", False), ("torch", "float16", False)]
        if "tensorrt" in have:
            out.append(("tensorrt", "float16", False))
    if only:
        keep = {item.strip() for item in only.split(",")}
        out = [r for r in out if f"{r[0]}{'-compiled' if r[2] else ''}:{r[1]}" in keep]
    return out


def make_relabeler(name, pkg, net, window, classes, device, batch, precision, acc="float32", compile=False):
    kw = dict(device=device, overlap=0.5, batch_size=batch, precision=precision, accumulate_dtype=acc, compile=compile)
    if name == "torch":
        return atso_fast.Relabeler.from_module(net, window=window, num_classes=classes, **kw)
    if name in OPENVINO_SETTINGS:
        return openvino_relabeler(pkg, **OPENVINO_SETTINGS[name], **kw)
    return atso_fast.Relabeler(pkg, runtime=name, **kw)


OPENVINO_SETTINGS = {
    "openvino-seq": {"streams": 1, "in_flight": 1},  # no overlap: the stitching waits for each batch
    "openvino-s2": {"streams": 2, "in_flight": None},  # two streams (three in flight), the defaults otherwise
    "openvino-old": {"streams": 1, "in_flight": None, "dynamic_batch": False},  # before issue 13's second pass
}
"""OpenVINO rows with other settings than the runtime's defaults."""


def openvino_relabeler(pkg, *, streams=None, in_flight=None, dynamic_batch=True, **kw):
    """A relabeler whose OpenVINO runtime has these settings (None: the runtime's default)."""
    from atso_fast.runtimes import OpenVinoRuntime

    rel = atso_fast.Relabeler(pkg, runtime="openvino", **kw)
    pk = rel.package
    rel.runtime = None  # the default runtime's buffers go before the new one compiles
    rel.runtime = OpenVinoRuntime(
        pk.onnx_path,
        precision=rel.precision,
        batch_size=rel.batch_size,
        window=pk.window,
        in_channels=pk.in_channels,
        streams=streams,
        in_flight=in_flight,
        dynamic_batch=dynamic_batch,
    )
    rel.runtime.reuse_output = True  # as the relabeler sets it: each result is taken before reuse
    return rel


def memory_child(method: str, classes: int, device: str, cfg, batch: int) -> dict:
    """Runs in a fresh process: peak memory growth of one method over the baseline."""
    window = cfg["mem_window"]
    net = head(classes).to(device)
    volume = np.random.default_rng(0).standard_normal(cfg["mem_shape"]).astype(np.float32)
    if method == "monai":
        run = lambda: monai_labels(net, volume, window, batch, device)  # noqa: E731
    elif method.startswith("unet-openvino-"):  # unet-openvino-s<streams>-f<in flight>: part C
        rel, volume = streams_relabeler(method, classes, cfg, batch)
        run = lambda: rel.relabel_volume(volume, normalized=True)  # noqa: E731
    else:  # ours-<accumulator dtype>[-onnxruntime|-auto]: torch on the same module, ORT, or auto
        parts = method.split("-")
        acc, runtime = parts[1], "-".join(parts[2:])
        kw = dict(device=device, batch_size=batch, accumulate_dtype=acc)
        if runtime:  # a package; auto: the default (CPU: OpenVINO when installed, else ORT)
            pkg = atso_fast.export_model(
                net.cpu(), tempfile.mkdtemp(), window=window, num_classes=classes, save_torch=runtime == "auto"
            )
            if runtime in OPENVINO_SETTINGS:
                rel = openvino_relabeler(pkg, **OPENVINO_SETTINGS[runtime], **kw)
            else:
                rel = atso_fast.Relabeler(pkg, runtime=runtime, **kw)
        else:
            rel = atso_fast.Relabeler.from_module(net, window=window, num_classes=classes, **kw)
        run = lambda: rel.relabel_volume(volume, normalized=True)  # noqa: E731  # noqa: E731
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        run()
        sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        reset_peak_rss()  # else the peak keeps import/volume-building spikes and hides ours
        base = _hwm_bytes()
        t = time.perf_counter()
        run()
        peak = _hwm_bytes() - base
    return {
        "method": method,
        "classes": classes,
        "batch": batch,
        "peak_GiB": peak / 2**30,
        "seconds": time.perf_counter() - t,
    }


def streams_relabeler(method: str, classes: int, cfg, batch: int):
    """Part C: the speed rows' MONAI UNet and volume, OpenVINO float32 with the streams and
    batches in flight that ``method`` (``unet-openvino-s2-f3``) names."""
    streams, in_flight = (int(part[1:]) for part in method.split("-")[2:4])
    net = builtin_network(classes, net="unet")[0]
    pkg = atso_fast.export_model(net, tempfile.mkdtemp(), window=cfg["window"], num_classes=classes, save_torch=False)
    rel = openvino_relabeler(pkg, streams=streams, in_flight=in_flight, batch_size=batch)
    volume = np.random.default_rng(0).standard_normal(cfg["shape"]).astype(np.float32)
    return rel, volume


def _hwm_bytes() -> int:
    """Peak RSS of this process in bytes (VmHWM: see ``atso_fast.bench.memory.peak_rss_mib``; with
    ``ru_maxrss`` every row at 105 classes read 0, hidden by the parent's peak)."""
    return int(peak_rss_mib() * 1024) * 1024


def memory_rows(classes: int, batch: int, args) -> list[dict]:
    """MONAI and ours at the same window batch, each in a fresh subprocess."""
    methods = ["monai", "ours-float32", "ours-float16"]
    if args.device == "cpu":
        # ORT, OpenVINO with one batch in flight, and auto: the package default (OpenVINO, two in flight)
        methods += ["ours-float16-onnxruntime", "ours-float16-openvino-seq", "ours-float16-auto"]
    rows = child_rows(methods, classes, batch, args)
    monai = rows[0]["peak_GiB"]
    for r in rows:
        r["fraction_of_monai"] = r["peak_GiB"] / monai if monai > 0 else float("nan")
    return rows


def child_rows(methods: list[str], classes: int, batch: int, args) -> list[dict]:
    """Each of ``methods`` in a fresh subprocess (:func:`memory_child`)."""
    rows = []
    for method in methods:
        cmd = [
            sys.executable,
            __file__,
            "--device",
            args.device,
            "--mem-child",
            method,
            "--classes",
            str(classes),
            "--memory-batches",
            str(batch),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


STREAMS_METHODS = ["unet-openvino-s1-f1", "unet-openvino-s1-f2", "unet-openvino-s2-f3", "unet-openvino-s2-f2"]
"""Part C: OpenVINO streams x batches in flight."""


def print_tables(res: dict) -> None:
    print(
        f"# {res['machine']}, {res['date']}; volume {res['shape']}, window {res['window']}, "
        f"batch {res['batch']}, overlap 0.5"
    )
    print(f"{'method':<32}{'C':>5}{'s/vol':>9}{'Mvox/s':>9}{'net s':>9}{'overhead':>10}{'vs MONAI':>10}{'agree':>9}")
    for r in res["speed"]:
        net = r.get("network_alone_seconds")
        ov = r.get("overhead")
        print(
            f"{r['method']:<32}{r['classes']:>5}{r['seconds']:>9.3f}{r['voxels_per_s'] / 1e6:>9.2f}"
            f"{net if net else float('nan'):>9.3f}{ov if ov is not None else float('nan'):>10.1%}"
            f"{r['speedup_vs_monai_fp32']:>9.2f}x{r['agreement']:>9.5f}"
        )
    if res.get("streams_memory"):
        print(f"# peak RSS of a relabel pass, MONAI UNet, volume {res['shape']}, window {res['window']}, OpenVINO f32")
        print(f"{'method':<26}{'C':>5}{'batch':>6}{'peak GiB':>10}{'s':>8}")
        for r in res["streams_memory"]:
            print(f"{r['method']:<26}{r['classes']:>5}{r['batch']:>6}{r['peak_GiB']:>10.3f}{r['seconds']:>8.2f}")
    if res.get("memory"):
        print(f"# peak memory of blending, volume {res['mem_shape']}, window {res['mem_window']} (conv head)")
        print(f"{'method':<26}{'C':>5}{'batch':>6}{'peak GiB':>10}{'of MONAI':>10}{'s':>8}")
        for r in res["memory"]:
            print(
                f"{r['method']:<26}{r['classes']:>5}{r['batch']:>6}{r['peak_GiB']:>10.3f}{r['fraction_of_monai']:>10.2f}"
                f"{r['seconds']:>8.2f}"
            )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--classes", type=int, nargs="*", default=[3, 105], help="speed rows (none: memory only)")
    ap.add_argument("--memory-classes", type=int, nargs="*", default=[105])
    ap.add_argument(
        "--memory-batches",
        type=int,
        nargs="+",
        default=None,
        help="window batches for the memory rows (default: the speed batch, then half of it)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", help="comma list of runtime:precision rows of ours (default: all)")
    ap.add_argument(
        "--streams-memory",
        action="store_true",
        help="part C instead of part B: OpenVINO one stream vs two, whole relabel pass",
    )
    ap.add_argument("--json", help="write results to this file")
    ap.add_argument("--mem-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    if args.mem_child:
        print(json.dumps(memory_child(args.mem_child, args.classes[0], args.device, cfg, args.memory_batches[0])))
        return 0
    mem_batches = args.memory_batches or [cfg["batch"], max(cfg["batch"] // 2, 1)]
    if args.device == "cuda" and not native.has_cuda():
        raise SystemExit(f"--device cuda needs a GPU and a CUDA build: {native.build_info()}")
    res = {
        "device": args.device,
        "machine": machine(args.device),
        "date": time.strftime("%Y-%m-%d"),
        "shape": list(cfg["shape"]),
        "window": list(cfg["window"]),
        "batch": cfg["batch"],
        "mem_shape": list(cfg["mem_shape"]),
        "mem_window": list(cfg["mem_window"]),
        "speed": [r for c in args.classes for r in speed_rows(c, args, cfg)],
    }
    mem = [(c, b) for c in args.memory_classes for b in mem_batches]
    if args.streams_memory:
        res["streams_memory"] = [r for c, b in mem for r in child_rows(STREAMS_METHODS, c, b, args)]
    else:
        res["memory"] = [r for c, b in mem for r in memory_rows(c, b, args)]
    print_tables(res)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
