"""ATSO on disk storage at two archive sizes: peak memory, time per round by phase, the relabel
step's runtime-busy fraction, and trainer throughput with 0 vs 2 DataLoader workers.

    flock /work/bench.lock python benchmarks/bench_atso_archive.py --out /tmp/atso_archive_bench

One synthetic CT archive (``make_archive``, npy, 64x128x128 phantoms) is written once; runs of
``--sizes`` training volumes (4 labelled + the rest unlabelled, 2 validation volumes, the same
files through list files) each run in a fresh subprocess (``--child``), 2 rounds of ATSO, and
report their peak resident memory (``VmHWM`` of ``/proc/self/status``) and the per-round
``timing`` of ``metrics.jsonl``. Then ``--loader`` times batches of the largest run's cache
(0 and 2 workers): cutting patches only, and cutting + training steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

SHAPE = (64, 128, 128)
LABELLED, VAL = 4, 2


def _config(data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "data": str(data),
        "num_classes": 5,
        "patch_size": [32, 64, 64],
        "batch_size": 2,
        "model": {"base_channels": 8, "depth": 3},
        "warmup_steps": args.warmup_steps,
        "rounds": 2,
        "steps_per_round": args.steps,
        "lr": 1e-2,
        "round_lr": 3e-3,
        "seed": 0,
        "out_dir": str(out),
        "storage": "disk",
        "relabel": {"batch_size": 4},
        "loader_workers": 0,
    }


def _archive(root: Path, n: int) -> dict[str, Any]:
    from atso_fast.datasets.synthetic import make_archive

    done = root / "archive.json"
    if done.is_file() and json.loads(done.read_text())["n"] >= n:
        return json.loads(done.read_text())
    start = time.perf_counter()
    archive = make_archive(root / "data", n, num_labelled=LABELLED, num_val=VAL, shape=SHAPE, fmt="npy", seed=0)
    archive = {**archive, "n": n, "seconds": time.perf_counter() - start}
    done.write_text(json.dumps(archive))
    return archive


def _listing(archive: dict[str, Any], n: int, path: Path) -> Path:
    """A list file of the first ``n`` training volumes (labelled first) and the validation ones."""
    listing = {
        "labelled": archive["labelled"],
        "unlabelled": archive["unlabelled"][: n - LABELLED],
        "val": archive["val"],
        "modality": "CT",
    }
    path.write_text(json.dumps(listing))
    return path


def child(config_file: Path) -> None:
    """Run one ATSO config on disk storage; print peak memory and per-round timings as JSON."""
    import torch

    from atso_fast.bench.memory import peak_rss_mib
    from atso_fast.train import ATSO

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    config = json.loads(config_file.read_text())
    start = time.perf_counter()
    atso = ATSO(config)
    cache_s = time.perf_counter() - start
    history = atso.run()
    print(
        json.dumps(
            {
                "vm_hwm_mib": peak_rss_mib(),
                "cache_s": cache_s,
                "built": atso.store.cache.built,
                "total_s": time.perf_counter() - start,
                "unlabelled": len(atso.store.unlabelled),
                "rounds": [
                    {
                        "round": m["round"],
                        "timing": m["timing"],
                        "relabel": m["relabel"],
                        "val_mean_dice": m["val_mean_dice"],
                    }
                    for m in history
                ],
            }
        )
    )


def _run_child(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"child run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loader_bench(config_file: Path, batches: int) -> dict[str, Any]:
    """Patches/s over the finished run's cache and pseudo labels: cut only, and cut + train."""
    import copy

    import torch

    from atso_fast.train import ATSO
    from atso_fast.train.loader import BatchDataset, make_loader
    from atso_fast.train.trainer import OptimConfig, train_loader

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    atso = ATSO(json.loads(config_file.read_text()))
    atso.resume()
    cfg = atso.config
    pseudo = atso._pseudo_sampler(sorted(atso.subsets["U1"]))
    out: dict[str, Any] = {"batch_size": cfg.batch_size, "patch": list(cfg.patch_size), "batches": batches}
    for workers in (0, 2):
        data = BatchDataset(atso._batches(pseudo, 1), (cfg.seed, 99, workers), batches)
        start = time.perf_counter()
        stamps = [time.perf_counter() for _ in make_loader(data, workers=workers)]
        out[f"cut_w{workers}"] = _rates(start, stamps, cfg.batch_size)
        model, stamps = copy.deepcopy(atso.model), []
        start = time.perf_counter()
        train_loader(
            model,
            make_loader(data, workers=workers),
            steps=batches,
            lr=1e-3,
            optim=OptimConfig(),
            on_step=lambda step, run: stamps.append(time.perf_counter()),  # noqa: B023 (called in this iteration)
        )
        out[f"train_w{workers}"] = _rates(start, stamps, cfg.batch_size)
    return out


def _rates(start: float, stamps: list[float], batch_size: int) -> dict[str, float]:
    """Patches/s over all batches, and after the first (worker start-up excluded)."""
    n = len(stamps)
    steady = (n - 1) * batch_size / (stamps[-1] - stamps[0]) if n > 1 and stamps[-1] > stamps[0] else float("nan")
    return {
        "patches_per_s": n * batch_size / (stamps[-1] - start),
        "steady_patches_per_s": steady,
        "first_batch_s": stamps[0] - start,
    }


def _machine() -> dict[str, str]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")), "?")
    return {
        "cpu": model,
        "cpus": str(os.cpu_count()),
        "date": time.strftime("%Y-%m-%d"),
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", type=Path, default=Path("/tmp/atso_archive_bench"), help="work folder (default: %(default)s)"
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[40, 320], help="training volumes per run")
    ap.add_argument("--warmup-steps", type=int, default=20, help="warm-up steps (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=20, help="steps per round (default: %(default)s)")
    ap.add_argument("--loader-batches", type=int, default=40, help="batches per loader timing (default: %(default)s)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--loader", type=Path, help="only time the loader on a finished run's config.json")
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    if args.loader:
        print(json.dumps({"machine": _machine(), **loader_bench(args.loader, args.loader_batches)}, indent=1))
        return 0
    report: dict[str, Any] = {"machine": _machine(), "shape": list(SHAPE), "runs": {}}
    archive = _archive(args.out, max(args.sizes))
    report["archive_s"] = archive["seconds"]
    for n in args.sizes:
        folder = args.out / f"run_{n}"
        config = _config(_listing(archive, n, args.out / f"list_{n}.json"), folder / "out", args)
        report["runs"][n] = _run_child(config, folder)
        print(json.dumps({n: report["runs"][n]}), flush=True)
    big = args.out / f"run_{max(args.sizes)}" / "config.json"
    report["loader"] = loader_bench(big, args.loader_batches)
    sizes = sorted(report["runs"])
    report["rss_ratio"] = report["runs"][sizes[-1]]["vm_hwm_mib"] / report["runs"][sizes[0]]["vm_hwm_mib"]
    report["machine"]["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
