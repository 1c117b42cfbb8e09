"""``atso-fast import-nnunet MODEL_FOLDER OUT_DIR``: an nnU-Net v2 model folder to a model package."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from atso_fast.cli.common import make_parser, parse_or_status
from atso_fast.cli.measure import measure_after_writing
from atso_fast.package import PackageError, load_package
from atso_fast.package.nnunet import import_nnunet

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(
        "atso-fast import-nnunet",
        "Import a trained nnU-Net v2 model folder (dataset.json, plans.json, fold_K/<checkpoint>) "
        "as an atso-fast model package: each fold's network from the plans, the folds' logits "
        "averaged in one ONNX graph verified against PyTorch, nnU-Net's preprocessing in model.json.",
    )
    p.add_argument("model_folder", type=Path, help="nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION")
    p.add_argument("out_dir", type=Path, help="package folder to write")
    p.add_argument(
        "--folds",
        "-f",
        nargs="+",
        default=None,
        help="folds to ensemble (numbers or 'all'; default: every fold_K holding the checkpoint)",
    )
    p.add_argument("--checkpoint", "-chk", default="checkpoint_final.pth", help="checkpoint file name in fold_K")
    p.add_argument("--quiet", action="store_true", help="do not print model.json")
    p.add_argument(
        "--no-measure",
        action="store_true",
        help="do not measure the runtimes' agreement and speed on this machine after writing the package "
        "(atso-fast measure does it later; without a record, auto follows its rule; default: measure)",
    )
    p.add_argument(
        "--measure-scan",
        type=Path,
        metavar="SCAN",
        help="measure on real windows of this scan (default: seeded random normalised windows)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """0 on success, 2 on bad usage or a model that cannot be imported (one line on stderr)."""
    args = parse_or_status(build_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        out = import_nnunet(args.model_folder, args.out_dir, folds=args.folds, checkpoint=args.checkpoint)
    except (PackageError, OSError) as exc:
        print(f"atso-fast import-nnunet: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if not args.no_measure:
        measure_after_writing(out, args.measure_scan, "atso-fast import-nnunet")
    if not args.quiet:
        print(json.dumps(load_package(out).to_json(), indent=2))
    return 0
