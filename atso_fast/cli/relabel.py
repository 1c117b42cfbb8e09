"""``atso-fast relabel MODEL_DIR INPUT OUTPUT_DIR``: bulk relabelling from the command line.

Builds the engine (a :class:`~atso_fast.engine.Relabeler`, or Ray actors with ``--engine ray``)
and runs :func:`atso_fast.archive.relabel_archive` / :func:`atso_fast.ray_engine.relabel_archive_ray`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from atso_fast import ray_engine
from atso_fast.archive import check_archive, relabel_archive
from atso_fast.cli.common import make_parser, one_line, parse_or_status
from atso_fast.datasets.cityscapes import (
    NUM_CLASSES,
    TRAIN_NAMES,
    is_cityscapes_split,
    label_id_colors,
    train_id_colors,
    train_to_label_map,
)
from atso_fast.engine import Relabeler
from atso_fast.engine.agreement import RECORD_KEY, agreement_table
from atso_fast.io import select_part
from atso_fast.kernels import native
from atso_fast.package import PackageError, load_package

__all__ = ["build_parser", "main"]


_RAY_FLAGS = ("--address", "--workers", "--gpus-per-worker", "--cpus-per-worker")
"""Options of ``--engine ray`` only (``None`` unless given)."""
DEFAULT_OVERLAP = 0.5

_DESCRIPTION = """\
Relabel an archive of volumes with an exported model package.

MODEL_DIR, INPUT and OUTPUT_DIR may be given as positionals (in this order) or as -m, -i and
-o, as nnU-Net's predict commands take them. INPUT is a folder (case ids are paths relative to
it without the image suffix and nnU-Net's _0000), a list file (.txt/.lst: one path per line;
case ids are the file names) or one image. OUTPUT_DIR gets one label map per case and
manifest.jsonl (one row per case). A folder that already holds finished cases needs --resume
(skip them) or --overwrite (redo them).

Natural images: PNG/JPEG frames (a 2D package with 3 input channels) get one label PNG each, of
the frame's size, under the same relative path (a JPEG frame's labels are a .png). A Cityscapes
folder (leftImg8bit or leftImg8bit/SPLIT) is read with its city sub-folders. A 19-class package is
taken to predict Cityscapes trainIds: --label-ids writes the official labelIds instead, and
--overlay pictures use the Cityscapes colours."""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``atso-fast relabel`` (nnU-Net spellings accepted where they exist)."""
    p = make_parser("atso-fast relabel", _DESCRIPTION)
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="MODEL_DIR INPUT OUTPUT_DIR, in this order; they fill whichever of the three -m/-i/-o leave out",
    )
    p.add_argument(
        "-m", "--model", dest="model_dir", help="model package folder (model.onnx + model.json) (default: the 1st PATH)"
    )
    p.add_argument(
        "-i", "--input", dest="input", help="folder, list file (.txt/.lst) or single image (default: the next PATH)"
    )
    p.add_argument(
        "-o",
        "--output",
        "--out",
        dest="output_dir",
        help="output folder: labels, confidence, manifest.jsonl (default: the next PATH)",
    )
    p.add_argument(
        "--runtime",
        default="auto",
        choices=["auto", "openvino", "onnxruntime", "torch", "tensorrt"],
        help="inference runtime; auto: the fastest one meeting the package's measured label agreement "
        "(atso-fast measure; recorded at export/import), else on CPU OpenVINO, else ONNX Runtime, else torch",
    )
    p.add_argument("--device", "-device", default="cpu", choices=["cpu", "cuda"], help="where the network runs")
    p.add_argument("--overlap", type=float, default=None, help=f"window overlap in [0, 1) (default: {DEFAULT_OVERLAP})")
    p.add_argument(
        "-step_size",
        "--step_size",
        dest="step_size",
        type=float,
        default=None,
        help="nnU-Net's spelling: window step as a fraction of the window, in (0, 1]; "
        f"overlap = 1 - step_size (default: {1 - DEFAULT_OVERLAP})",
    )
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=4, help="windows per forward pass")
    p.add_argument(
        "--threshold", type=float, default=0.0, help="voxels whose max probability is below this get --ignore-index"
    )
    p.add_argument("--ignore-index", type=int, default=255, help="label of voxels below --threshold")
    p.add_argument("--mirror", action="store_true", help="mirror test-time augmentation")
    p.add_argument(
        "--disable_tta",
        dest="mirror",
        action="store_false",
        help="nnU-Net's spelling: no mirror test-time augmentation (default here)",
    )
    p.add_argument(
        "--precision", default="float32", choices=["float32", "float16", "bfloat16"], help="network precision"
    )
    p.add_argument(
        "--accumulate-dtype",
        default="float32",
        choices=["float32", "float16"],
        help="blending accumulator precision (float16 halves its memory)",
    )
    p.add_argument(
        "--nonfinite",
        default="fail",
        choices=["fail", "ignore"],
        help="NaN/inf input voxels: fail the case, or label them --ignore-index",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of the runtime (ONNX Runtime session or torch intra-op; default: all cores)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the torch runtime (implies --runtime torch; slow first batch)",
    )
    p.add_argument("--save-confidence", action="store_true", help="also write <case>_confidence (uint8)")
    p.add_argument(
        "--save-probabilities",
        "--save_probabilities",
        action="store_true",
        help="also write <case>_probabilities.npz: float32 softmax (C, Z, Y, X) on the input's grid, "
        "key 'probabilities', as nnU-Net's --save_probabilities",
    )
    p.add_argument(
        "--overlay",
        action="store_true",
        help="also write <case>_overlay.png: the three orthogonal slices through the labels with the "
        "labels on top, for a person to check (a 2D frame: the whole frame in colour)",
    )
    p.add_argument(
        "--label-ids",
        action="store_true",
        help="write Cityscapes labelIds instead of the network's trainIds (a 19-class Cityscapes "
        "package; --ignore-index pixels become 0, unlabeled)",
    )
    p.add_argument(
        "--recursive",
        action="store_true",
        help="descend into sub-folders of a folder INPUT (always on for a Cityscapes leftImg8bit folder)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        "--continue_prediction",
        action="store_true",
        help="skip cases already finished in OUTPUT_DIR/manifest.jsonl (failed ones are retried)",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="redo cases already finished in OUTPUT_DIR (their manifest rows are replaced)",
    )
    p.add_argument(
        "--num-parts",
        "--num_parts",
        "-num_parts",
        type=int,
        default=1,
        help="split the sorted inputs into this many parts (one process each) ...",
    )
    p.add_argument(
        "--part-id",
        "--part_id",
        "-part_id",
        type=int,
        default=0,
        help="... and relabel only this one, in [0, num-parts)",
    )
    p.add_argument("--readers", "-npp", type=int, default=2, help="reader threads (decode ahead)")
    p.add_argument("--writers", "-nps", type=int, default=2, help="writer threads (compress and write behind)")
    p.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help="local: threads in this process; ray: actors on a Ray cluster",
    )
    ray = p.add_argument_group("--engine ray")
    ray.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster address (default: a running local cluster, else a new local instance)",
    )
    ray.add_argument("--workers", type=int, metavar="N", help="actors, each loading the model once (default: 1)")
    ray.add_argument(
        "--gpus-per-worker", type=float, metavar="G", help="GPUs per actor (default: 0, or 1 with --device cuda)"
    )
    ray.add_argument("--cpus-per-worker", type=float, metavar="C", help="CPUs per actor (default: 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print the package's measured runtime agreement table (atso-fast measure; default: off)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    return p


def _resolve(args: argparse.Namespace) -> None:
    """Fill MODEL_DIR/INPUT/OUTPUT_DIR from the positionals and the overlap from -step_size.

    Raises:
        ValueError: a path given twice or missing, or both --overlap and -step_size.
    """
    free = list(args.paths)
    for name in ("model_dir", "input", "output_dir"):
        if getattr(args, name) is None:
            if free:
                setattr(args, name, free.pop(0))
            else:
                raise ValueError(f"{name.upper()} missing: give MODEL_DIR INPUT OUTPUT_DIR (or -m, -i, -o)")
    if free:
        raise ValueError(f"{' '.join(free)}: a path given twice (positionals and -m/-i/-o name the same three)")
    if args.step_size is not None:
        if args.overlap is not None:
            raise ValueError("give --overlap or -step_size, not both (overlap = 1 - step_size)")
        if not 0 < args.step_size <= 1:
            raise ValueError(f"-step_size must be in (0, 1], got {args.step_size}")
        args.overlap = 1.0 - args.step_size
    elif args.overlap is None:
        args.overlap = DEFAULT_OVERLAP


def _import_in_background(*modules: str) -> None:
    """Import ``modules`` in order on a daemon thread. The engine resamples scans with torch (a
    ~1 s import) and ``auto`` and OpenVINO need openvino (~0.2 s): begun here, they overlap the
    checks, the package's hash and the runtime's load, the parts that release the GIL, instead of
    adding to the time before the first window; an import the main thread needs first just
    waits for this one. A module that fails to import is left for the main thread to report."""

    def run() -> None:
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception:  # noqa: BLE001, S112 - reported where it is needed, if it is
                continue

    threading.Thread(target=run, name="atso-import", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    """``atso-fast relabel ...``: 0 when every case succeeded, 1 when any failed, 2 on bad usage,
    an input that cannot be relabelled as asked, or a model package that cannot be loaded."""
    args = parse_or_status(build_parser(), argv)
    if isinstance(args, int):
        return args
    if args.engine == "local":
        _import_in_background(*(["openvino"] if args.runtime in ("auto", "openvino") else []), "torch")
    try:
        _resolve(args)
        args.recursive = args.recursive or is_cityscapes_split(args.input)
        select_part([], args.num_parts, args.part_id)
        for name in ("readers", "writers", "batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        _check_settings(args)
        ray_flags = [f for f in _RAY_FLAGS if getattr(args, f[2:].replace("-", "_")) is not None]
        if args.engine == "local" and ray_flags:
            raise ValueError(f"{', '.join(ray_flags)} only apply to --engine ray")
        # everything about the inputs and the output folder, before the (slow) model load
        check_archive(args.input, args.output_dir, **_archive_kwargs(args))
    except (ValueError, OSError) as exc:  # InputError is a ValueError
        return _usage_error(str(exc))
    try:
        args.label_map, args.palette = _label_space(args)
    except PackageError as exc:
        return _usage_error(f"cannot load model package {args.model_dir}: {_one_line(str(exc))}")
    except ValueError as exc:
        return _usage_error(str(exc))
    run, stop_errors = _ray_runner(args) if args.engine == "ray" else _local_runner(args)
    if run is None:
        return 2
    try:
        summary = run(args.input, args.output_dir, progress=False if args.quiet else None, **_archive_kwargs(args))
    except (ValueError, OSError) as exc:  # InputError, or a Ray cluster that cannot host a worker
        return _usage_error(str(exc))
    except stop_errors as exc:  # the Ray run stopped; finished cases are in the manifest
        print(f"atso-fast relabel: error: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("atso-fast relabel: interrupted; finished cases are kept, rerun with --resume", file=sys.stderr)
        return 130
    _print_summary(summary, args)
    return 1 if summary["failed"] else 0


def _check_settings(args: argparse.Namespace) -> None:
    """What can be wrong with the options themselves, said as such (not as a model that cannot load)."""
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold is a probability in [0, 1], got {args.threshold}")
    if not 0 <= args.ignore_index <= 65535:
        raise ValueError(f"--ignore-index must be in [0, 65535], got {args.ignore_index}")
    if args.device == "cuda" and not native.has_cuda():
        info = native.build_info()
        raise ValueError(
            f"--device cuda needs an NVIDIA GPU and a CUDA build of atso-fast (GPUs visible: "
            f"{info['cuda_devices']}, built with CUDA: {info['cuda']}); use --device cpu"
        )


def _archive_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "recursive": args.recursive,
        "resume": args.resume,
        "overwrite": args.overwrite,
        "num_parts": args.num_parts,
        "part_id": args.part_id,
        "save_confidence": args.save_confidence,
        "save_probabilities": args.save_probabilities,
        "save_overlay": args.overlay,
    }


def _usage_error(message: str) -> int:
    print(f"atso-fast relabel: error: {_one_line(message)}", file=sys.stderr)
    return 2


def _one_line(message: str) -> str:
    return one_line(message)


def _relabeler_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "runtime": args.runtime,
        "device": args.device,
        "overlap": args.overlap,
        "batch_size": args.batch_size,
        "threshold": args.threshold,
        "ignore_index": args.ignore_index,
        "mirror": args.mirror,
        "precision": args.precision,
        "accumulate_dtype": args.accumulate_dtype,
        "nonfinite": args.nonfinite,
        "threads": args.threads,
        "compile": args.compile,
        "save_probabilities": args.save_probabilities,
        **({"label_map": args.label_map} if args.label_map is not None else {}),
    }


def _label_space(args: argparse.Namespace) -> tuple[dict[int, int] | None, Any]:
    """``(label_map, overlay palette)``: Cityscapes trainIds -> labelIds with --label-ids, and the
    Cityscapes colours (of the written ids) for a 19-class package's overlays.

    Raises:
        PackageError: the package cannot be loaded; ValueError: --label-ids for another package.
    """
    if not (args.label_ids or args.overlay):
        return None, None
    package = load_package(args.model_dir)
    cityscapes = package.num_classes == NUM_CLASSES and package.class_names in (None, list(TRAIN_NAMES))
    if args.label_ids and not cityscapes:
        raise ValueError(
            f"--label-ids maps Cityscapes trainIds to labelIds: the package must predict the "
            f"{NUM_CLASSES} Cityscapes classes (class_names the Cityscapes names, or none); "
            f"{args.model_dir} has {package.num_classes} classes"
            + (f" ({', '.join(package.class_names[:4])}, ...)" if package.class_names else "")
        )
    label_map = None
    if args.label_ids:
        label_map = {k: v for k, v in train_to_label_map().items() if k < NUM_CLASSES}
        label_map[args.ignore_index] = 0  # unlabeled
    palette = (label_id_colors() if args.label_ids else train_id_colors()) if cityscapes else None
    return label_map, palette


def _local_runner(args: argparse.Namespace) -> tuple[Callable[..., dict] | None, tuple]:
    """``relabel_archive`` bound to a relabeler built here (``None`` if it cannot be built)."""
    relabeler = _load_relabeler(args)
    if relabeler is None:
        return None, ()
    reason = getattr(relabeler, "runtime_reason", None)  # a custom relabeler may not say
    if not args.quiet and reason:  # which runtime runs, and why (the measured agreement or the rule): once per run
        print(f"atso-fast relabel: runtime {reason}", file=sys.stderr)
        record = relabeler.package.extra.get(RECORD_KEY)
        if args.verbose and isinstance(record, dict):
            print(agreement_table(record), file=sys.stderr)
    return partial(
        relabel_archive, relabeler, readers=args.readers, writers=args.writers, overlay_palette=args.palette
    ), ()


def _ray_runner(args: argparse.Namespace) -> tuple[Callable[..., dict] | None, tuple]:
    """``relabel_archive_ray`` bound to the CLI options, and the error that stops its run."""
    try:
        run = ray_engine.ray_runner(
            args.model_dir,
            address=args.address,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            **_relabeler_kwargs(args),
        )
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
    except Exception as exc:  # bad ONNX, mismatched model.json, missing runtime, bad option ...
        detail = _one_line(str(exc)) if str(exc).strip() else type(exc).__name__
        what = (
            f"cannot load model package {args.model_dir}"
            if isinstance(exc, PackageError)
            else f"cannot start relabelling with {args.model_dir}"
        )
        _usage_error(f"{what}: {detail}")
        return None


def _print_summary(summary: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(summary, indent=None, default=str))
    elif not args.quiet:
        print(
            f"relabelled {summary['done']} of {summary['total']} cases "
            f"({summary['skipped']} skipped, {summary['failed']} failed) in "
            f"{summary['seconds']:.1f} s: {summary['cases_per_s']:.2f} cases/s, "
            f"{summary['voxels_per_s'] / 1e6:.3g} Mvox/s, runtime busy "
            f"{100 * summary['busy_fraction']:.0f}%"
            + (f", runtime {summary['runtime']}" if summary.get("runtime") else "")
            + (
                f"; {len(summary['skipped_inputs'])} inputs left out (see above)"
                if summary.get("skipped_inputs")
                else ""
            )
        )
