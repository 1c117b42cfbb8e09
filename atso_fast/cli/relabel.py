"""``atso-fast relabel MODEL_DIR INPUT OUTPUT_DIR``: bulk relabelling from the command line.

Builds the engine (a :class:`~atso_fast.engine.Relabeler`, or Ray actors with ``--engine ray``)
and runs :func:`atso_fast.archive.relabel_archive` / :func:`atso_fast.ray_engine.relabel_archive_ray`.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from atso_fast import ray_engine
from atso_fast.archive import relabel_archive
from atso_fast.engine import Relabeler
from atso_fast.io import InputError, select_part
from atso_fast.package import PackageError

__all__ = ["build_parser", "main"]


_RAY_FLAGS = ("--address", "--workers", "--gpus-per-worker", "--cpus-per-worker")
"""Options of ``--engine ray`` only (``None`` unless given)."""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``atso-fast relabel`` (nnU-Net-like aliases where they exist)."""
    p = argparse.ArgumentParser(
        prog="atso-fast relabel",
        description="Relabel an archive of volumes with an exported model package.")
    p.add_argument("model_dir", help="model package folder (model.onnx + model.json)")
    p.add_argument("input", help="folder, list file (.txt/.lst) or single image")
    p.add_argument("output_dir", help="output folder (labels, confidence, manifest.jsonl)")
    p.add_argument("--runtime", default="auto", choices=["auto", "openvino", "onnxruntime", "torch", "tensorrt"])
    p.add_argument("--device", "-device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("-o", "--overlap", type=float, default=0.5, help="window overlap in [0, 1)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="max probability below this becomes --ignore-index")
    p.add_argument("--ignore-index", type=int, default=255)
    p.add_argument("--mirror", action="store_true", help="mirror test-time augmentation")
    p.add_argument("--precision", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--accumulate-dtype", default="float32", choices=["float32", "float16"],
                   help="blending accumulator precision (float16 halves its memory)")
    p.add_argument("--nonfinite", default="fail", choices=["fail", "ignore"],
                   help="NaN/inf input voxels: fail the case, or label them --ignore-index")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the runtime (ONNX Runtime session or torch intra-op; default: all cores)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the torch runtime (implies --runtime torch; slow first batch)")
    p.add_argument("--save-confidence", action="store_true", help="also write <case>_confidence")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--resume", "--continue_prediction", action="store_true",
                   help="skip cases already finished in OUTPUT_DIR/manifest.jsonl")
    p.add_argument("--num-parts", "--num_parts", type=int, default=1)
    p.add_argument("--part-id", "--part_id", type=int, default=0)
    p.add_argument("--readers", "-npp", type=int, default=2, help="reader threads")
    p.add_argument("--writers", "-nps", type=int, default=2, help="writer threads")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: threads in this process; ray: actors on a Ray cluster")
    group = p.add_argument_group("--engine ray")
    group.add_argument("--address", metavar="ADDR",
                       help="Ray cluster address (default: a running local cluster, else a new "
                       "local instance)")
    group.add_argument("--workers", type=int, metavar="N",
                       help="actors, each loading the model once (default 1)")
    group.add_argument("--gpus-per-worker", type=float, metavar="G",
                       help="GPUs per actor (default 0, or 1 with --device cuda)")
    group.add_argument("--cpus-per-worker", type=float, metavar="C", help="CPUs per actor (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``atso-fast relabel ...``: 0 when every case succeeded, 1 when any failed, 2 on bad usage,
    a missing input or a model package that cannot be loaded."""
    try:
        args = build_parser().parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        select_part([], args.num_parts, args.part_id)
        for name in ("readers", "writers", "batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        ray_flags = [f for f in _RAY_FLAGS if getattr(args, f[2:].replace("-", "_")) is not None]
        if args.engine == "local" and ray_flags:
            raise ValueError(f"{', '.join(ray_flags)} only apply to --engine ray")
    except ValueError as exc:
        return _usage_error(str(exc))
    run, stop_errors = _ray_runner(args) if args.engine == "ray" else _local_runner(args)
    if run is None:
        return 2
    try:
        summary = run(args.input, args.output_dir, recursive=args.recursive, resume=args.resume,
                      num_parts=args.num_parts, part_id=args.part_id,
                      save_confidence=args.save_confidence,
                      progress=False if args.quiet else None)
    except (InputError, OSError) as exc:
        return _usage_error(str(exc))
    except stop_errors as exc:  # the Ray run stopped; finished cases are in the manifest
        print(f"atso-fast relabel: error: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("atso-fast relabel: interrupted; finished cases are kept, rerun with --resume",
              file=sys.stderr)
        return 130
    _print_summary(summary, args)
    return 1 if summary["failed"] else 0


def _usage_error(message: str) -> int:
    print(f"atso-fast relabel: error: {_one_line(message)}", file=sys.stderr)
    return 2


def _one_line(message: str) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def _relabeler_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"runtime": args.runtime, "device": args.device, "overlap": args.overlap,
            "batch_size": args.batch_size, "threshold": args.threshold,
            "ignore_index": args.ignore_index, "mirror": args.mirror, "precision": args.precision,
            "accumulate_dtype": args.accumulate_dtype, "nonfinite": args.nonfinite, "threads": args.threads,
            "compile": args.compile}


def _local_runner(args: argparse.Namespace) -> tuple[Callable[..., dict] | None, tuple]:
    """``relabel_archive`` bound to a relabeler built here (``None`` if it cannot be built)."""
    relabeler = _load_relabeler(args)
    if relabeler is None:
        return None, ()
    return partial(relabel_archive, relabeler, readers=args.readers, writers=args.writers), ()


def _ray_runner(args: argparse.Namespace) -> tuple[Callable[..., dict] | None, tuple]:
    """``relabel_archive_ray`` bound to the CLI options, and the error that stops its run."""
    try:
        run = ray_engine.ray_runner(
            args.model_dir, address=args.address, workers=args.workers,
            gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
            **_relabeler_kwargs(args))
    except PackageError as exc:
        _usage_error(f"cannot load model package {args.model_dir}: {_one_line(str(exc))}")
        return None, ()
    except (ImportError, ValueError) as exc:  # Ray missing (names the extra), bad resources
        _usage_error(str(exc))
        return None, ()
    return run, (ray_engine.RayRunError,)


def _load_relabeler(args: argparse.Namespace) -> Any:
    """Build the engine; any failure is one stderr line (no traceback) and ``None``."""
    try:
        return Relabeler(args.model_dir, **_relabeler_kwargs(args))
    except Exception as exc:  # bad ONNX, mismatched model.json, missing runtime, ...
        detail = _one_line(str(exc)) if str(exc).strip() else type(exc).__name__
        _usage_error(f"cannot load model package {args.model_dir}: {detail}")
        return None


def _print_summary(summary: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(summary, indent=None, default=str))
    elif not args.quiet:
        print(f"relabelled {summary['done']} of {summary['total']} cases "
              f"({summary['skipped']} skipped, {summary['failed']} failed) in "
              f"{summary['seconds']:.1f} s: {summary['cases_per_s']:.2f} cases/s, "
              f"{summary['voxels_per_s'] / 1e6:.3g} Mvox/s, runtime busy "
              f"{100 * summary['busy_fraction']:.0f}%"
              + (f", runtime {summary['runtime']}" if summary.get("runtime") else ""))
