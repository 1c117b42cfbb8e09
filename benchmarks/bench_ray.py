"""Throughput of the Ray engine (1 and 2 workers) vs the local engine, measured in one run.

A synthetic archive of CT-like int16 ``.nii.gz`` volumes (``atso_fast.datasets.synthetic.synthetic_ct``) is
relabelled with one exported package (the built-in plain conv-net, seeded weights):

- ``local``: ``atso_fast.archive.relabel_archive`` (reader/writer threads, one relabeler);
- ``ray xN``: ``atso_fast.ray_engine.relabel_archive_ray`` with N actors on a local Ray
  instance (started once, not timed), ``--cpus-per-worker`` CPUs reserved per actor.

Correctness first: every engine's label files must equal the local engine's byte for byte, or
the run fails (exit 1) before anything is reported. Each configuration then runs ``--repeats``
times into fresh folders (median reported). A Ray run's wall time includes starting its actor
pool (each actor loads the model); ``startup s`` is the median wall time of the same
configuration on a one-case archive, so ``(cases - 1) / (wall - startup)`` estimates the
steady-state rate a long archive approaches.

Run from the repository root::

    python benchmarks/bench_ray.py                        # 2-core CPU defaults, ~2 minutes
    python benchmarks/bench_ray.py --cases 24 --shape 64 128 128 --workers 1 2 4 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from atso_fast.bench.networks import export_builtin
from atso_fast.datasets.synthetic import synthetic_ct

__all__ = ["build_parser", "format_table", "main", "make_archive", "run_config"]


def make_archive(folder: Path, cases: int, shape: tuple[int, int, int]) -> list[Path]:
    """Write ``cases`` synthetic CT volumes ``case_NNN.nii.gz`` (``(X, Y, Z)`` on disk)."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(cases):
        path = folder / f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(synthetic_ct(shape, seed=i).T, np.diag([0.8, 0.8, 1.5, 1.0])), path)
        paths.append(path)
    return paths


def _label_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.nii.gz"))}


def _run_once(
    engine: str, workers: int, model: Path, inputs: Any, out: Path, args: argparse.Namespace
) -> dict[str, Any]:
    if engine == "local":
        from atso_fast.archive import relabel_archive
        from atso_fast.engine.relabeler import Relabeler

        relabeler = Relabeler(model, batch_size=args.batch)
        start = time.perf_counter()  # the model load is outside, as in a long-running job
        summary = relabel_archive(relabeler, inputs, out, overwrite=True, progress=False)
    else:
        from atso_fast.ray_engine import relabel_archive_ray

        start = time.perf_counter()  # includes starting the actor pool (model load per actor)
        summary = relabel_archive_ray(
            model,
            inputs,
            out,
            workers=workers,
            overwrite=True,
            progress=False,
            cpus_per_worker=args.cpus_per_worker,
            batch_size=args.batch,
        )
    wall = time.perf_counter() - start
    if summary["failed"]:
        raise RuntimeError(f"{engine} x{workers}: cases failed: {summary['failures']}")
    return {"wall": wall, "busy": summary["busy_fraction"]}


def run_config(
    engine: str,
    workers: int,
    model: Path,
    paths: list[Path],
    work: Path,
    reference: dict[str, bytes] | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Check one configuration's outputs against ``reference``, then time it; one table row."""
    name = "local" if engine == "local" else f"ray x{workers}"
    tag = name.replace(" ", "")
    _run_once(engine, workers, model, paths[:1], work / f"{tag}-warmup", args)
    runs = [_run_once(engine, workers, model, paths, work / f"{tag}-{r}", args) for r in range(args.repeats)]
    if reference is not None:
        ours = _label_files(work / f"{tag}-0")
        bad = sorted(k for k in reference if ours.get(k) != reference[k])
        if bad or sorted(ours) != sorted(reference):
            raise RuntimeError(f"{name}: label files differ from the local engine's: {bad}")
    startup = statistics.median(
        _run_once(engine, workers, model, paths[:1], work / f"{tag}-one-{r}", args)["wall"] for r in range(args.repeats)
    )
    wall = statistics.median(r["wall"] for r in runs)
    cases = len(paths)
    return {
        "engine": name,
        "workers": workers,
        "cases": cases,
        "wall_s": wall,
        "cases_per_s": cases / wall,
        "startup_s": startup,
        "steady_cases_per_s": (cases - 1) / (wall - startup) if wall > startup else None,
        "busy_fraction": statistics.median(r["busy"] for r in runs),
    }


def format_table(report: dict[str, Any]) -> str:
    """The rows as a fixed-width table, speed-ups relative to the local engine."""
    rows = report["rows"]
    base = rows[0]["cases_per_s"]
    title = (
        f"{report['cases']} cases of {tuple(report['shape'])} (Z, Y, X), window "
        f"{tuple(report['window'])}, {report['machine']}"
    )
    header = f"{'engine':<10}{'wall s':>9}{'cases/s':>10}{'vs local':>10}{'startup s':>11}{'steady/s':>10}{'busy':>7}"
    lines = [title, header]
    for row in rows:
        steady = row["steady_cases_per_s"]
        lines.append(
            f"{row['engine']:<10}{row['wall_s']:>9.2f}{row['cases_per_s']:>10.2f}"
            f"{row['cases_per_s'] / base:>9.2f}x{row['startup_s']:>11.2f}"
            f"{(f'{steady:.2f}' if steady else '-'):>10}"
            f"{100 * row['busy_fraction']:>6.0f}%"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_ray.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=12, help="volumes in the archive")
    p.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=(48, 96, 96))
    p.add_argument("--window", type=int, nargs=3, metavar=("Z", "Y", "X"), default=(32, 64, 64))
    p.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray pool sizes")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per configuration (median)")
    p.add_argument("--workdir", type=Path, help="keep archive and outputs here (default: temp dir)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    return p


def _bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import ray

    if args.cases < 2 or args.repeats < 1 or min(args.workers) < 1:
        raise ValueError(
            f"need --cases >= 2, --repeats >= 1, --workers >= 1, got {args.cases}, {args.repeats}, {args.workers}"
        )
    paths = make_archive(work / "in", args.cases, tuple(args.shape))
    model, net = export_builtin(work / "model", window=tuple(args.window), classes=3, net="convnet")
    local = run_config("local", 1, model, paths, work, None, args)
    reference = _label_files(work / "local-0")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    try:
        rows = [local] + [run_config("ray", n, model, paths, work, reference, args) for n in args.workers]
    finally:
        ray.shutdown()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, ray {ray.__version__}"
    return {
        "cases": args.cases,
        "shape": list(args.shape),
        "window": list(args.window),
        "net": net,
        "machine": machine,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.workdir is not None:
            report = _bench(args, args.workdir)
        else:
            with tempfile.TemporaryDirectory(prefix="bench_ray-") as tmp:
                report = _bench(args, Path(tmp))
    except (RuntimeError, ValueError) as exc:
        print(f"bench_ray: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
