"""``atso-fast export CHECKPOINT OUT_DIR``: a checkpoint to a verified ONNX model package."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from atso_fast.package import PackageError, export_model, load_package
from atso_fast.train.unet import build_model

__all__ = ["main"]


def _load_checkpoint_module(path: Path):
    """A module from a checkpoint: a pickled ``nn.Module`` (trusted file) or an atso-fast
    training checkpoint holding ``model_config`` + ``model_state``."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, torch.nn.Module):
        return obj, {}
    if isinstance(obj, dict) and "model_state" in obj and "model_config" in obj:
        model = build_model(obj["model_config"])
        model.load_state_dict(obj["model_state"])
        return model, obj
    raise PackageError(f"{path}: expected a pickled torch.nn.Module or an atso-fast checkpoint "
                       "with model_config/model_state")


def main(argv: list[str] | None = None) -> int:
    """``atso-fast export CHECKPOINT OUT_DIR [--window Z Y X] [--classes C] ...``."""
    ap = argparse.ArgumentParser(prog="atso-fast export", description=main.__doc__)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--window", type=int, nargs="+", help="patch size (defaults to the checkpoint's)")
    ap.add_argument("--classes", type=int, help="output channels (defaults to the checkpoint's)")
    ap.add_argument("--in-channels", type=int)
    ap.add_argument("--kind", choices=["logits", "probabilities"], default="logits")
    ap.add_argument("--normalization", help="JSON policy, e.g. '{\"scheme\": \"zscore\"}'")
    ap.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                    help="spacing the network was trained at, z y x in mm (y x for a 2D model keeps z); "
                    "scans are resampled to it and the labels back (default: the checkpoint's, else none)")
    ap.add_argument("--orientation", choices=["as-stored", "RAS"],
                    help="as-stored (nnU-Net's way, default) or RAS (reorient to canonical, as MONAI)")
    ap.add_argument("--class-names", nargs="+", metavar="NAME", help="one name per class")
    ap.add_argument("--crop-to-nonzero", action="store_true", help="crop scans to their nonzero box (nnU-Net)")
    ap.add_argument("--grid", choices=["monai", "nnunet"], help="window grid and gaussian profile (default monai)")
    args = ap.parse_args(argv)
    try:
        module, ckpt = _load_checkpoint_module(args.checkpoint)
        cfg = ckpt.get("package", {}) if isinstance(ckpt, dict) else {}
        window = args.window or cfg.get("window")
        classes = args.classes or cfg.get("num_classes")
        if window is None or classes is None:
            raise PackageError("--window and --classes are required for a checkpoint that does not record them")
        norm = json.loads(args.normalization) if args.normalization else cfg.get("normalization")
        spec = {k: v for k, v in (("crop_to_nonzero", args.crop_to_nonzero or None), ("grid", args.grid)) if v}
        out = export_model(module, args.out_dir, window=window, num_classes=classes, kind=args.kind,
                           normalization=norm, in_channels=args.in_channels or cfg.get("in_channels", 1),
                           spacing=args.spacing or cfg.get("spacing"), orientation=args.orientation,
                           class_names=args.class_names or cfg.get("class_names"), preprocessing=spec or None)
    except (PackageError, OSError, ValueError) as exc:
        print(f"atso-fast export: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(load_package(out).to_json()))
    return 0
