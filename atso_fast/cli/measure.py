"""``atso-fast measure PKG [--scan FILE]``: measure which runtimes run a package's network how
exactly and how fast on this machine, and record it in ``model.json`` (``runtime="auto"`` then
picks the fastest runtime that meets the tolerance: :mod:`atso_fast.engine.agreement`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from atso_fast.cli.common import make_parser, one_line, parse_or_status
from atso_fast.engine import Relabeler
from atso_fast.engine.agreement import DEFAULT_TOLERANCE, agreement_table, measure_package
from atso_fast.io import read_volume
from atso_fast.runtimes.base import PRECISIONS

__all__ = ["build_parser", "main", "measure_and_say", "measure_after_writing"]


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("atso-fast measure", __doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("model_dir", type=Path, help="model package folder (model.json + model.onnx)")
    p.add_argument(
        "--scan",
        type=Path,
        help="measure on real windows of this scan (any format relabel reads); "
        "default: seeded random normalised windows",
    )
    p.add_argument(
        "--windows",
        type=int,
        default=None,
        help="windows to run (default: about 4 million voxels' worth, 2 to 8 windows)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"label agreement auto requires, in (0, 1] (default {DEFAULT_TOLERANCE})",
    )
    p.add_argument(
        "--precisions",
        default="float32",
        help="comma list of float32,bfloat16,float16, or 'all': the precisions to measure each runtime "
        "in (default: float32; relabel --precision P with --runtime auto chooses among P's results)",
    )
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    return p


def parse_precisions(text: str) -> tuple[str, ...]:
    """``"float32,bfloat16"`` or ``"all"`` as a tuple of precisions; ValueError naming a bad one."""
    wanted = PRECISIONS if text.strip() == "all" else tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in wanted if p not in PRECISIONS]
    if bad or not wanted:
        raise ValueError(
            f"--precisions: unknown precision {bad[0] if bad else text!r} (choose from {', '.join(PRECISIONS)} or all)"
        )
    return tuple(dict.fromkeys(wanted))


def measure_and_say(
    model_dir: Path,
    *,
    scan: Path | None = None,
    windows: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    precisions: Sequence[str] = ("float32",),
    stream=sys.stdout,
) -> dict:
    """Measure, record, and print the table and what ``auto`` would run now."""
    volume, spacing, affine = None, None, None
    if scan is not None:
        volume, meta = read_volume(scan)
        spacing, affine = meta.spacing, meta.affine
    record = measure_package(
        model_dir, volume, spacing=spacing, affine=affine, count=windows, tolerance=tolerance, precisions=precisions
    )
    rel = Relabeler(model_dir)
    print(agreement_table(record), file=stream)
    print(f"auto would run {rel.runtime_reason}", file=stream)
    return record


def measure_after_writing(model_dir: Path, scan: Path | None, command: str) -> None:
    """After export/import: measure and record, the table on stderr; a failure is one warning
    line (the package is written and usable; ``auto`` then follows its rule)."""
    print(f"{command}: measuring the runtimes on this machine (--no-measure skips it)", file=sys.stderr)
    try:
        measure_and_say(model_dir, scan=scan, stream=sys.stderr)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"{command}: warning: runtimes not measured: {one_line(str(exc))}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_or_status(build_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        record = measure_and_say(
            args.model_dir,
            scan=args.scan,
            windows=args.windows,
            tolerance=args.tolerance,
            precisions=parse_precisions(args.precisions),
            stream=sys.stderr if args.json else sys.stdout,
        )
        if args.json:
            print(json.dumps(record))
    except (ValueError, OSError) as exc:  # PackageError and InputError are ValueErrors
        print(f"atso-fast measure: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    return 0
