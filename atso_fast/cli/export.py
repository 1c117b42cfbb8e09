"""``atso-fast export CHECKPOINT OUT_DIR``: a training checkpoint to a verified ONNX model package."""

from __future__ import annotations

import argparse
import importlib
import io
import json
import pickle
import sys
from pathlib import Path
from typing import Any

from atso_fast.cli.common import make_parser, one_line
from atso_fast.cli.measure import measure_after_writing
from atso_fast.io import InputError, read_regular_file
from atso_fast.package import PackageError, export_model, load_package
from atso_fast.train.atso import ATSOConfig, build_model

__all__ = ["build_parser", "load_checkpoint", "main"]

_DESCRIPTION = """\
Export a checkpoint to a verified model package (model.onnx + model.pt2 + model.json) for
`atso-fast relabel`.

Checkpoints it takes:
  1. an atso-fast training checkpoint: runs/<method>/checkpoint.pt written by `atso-fast train`
     or `atso-fast demo` (also the warm-up's); window, classes, input channels and intensity
     normalisation come from the checkpoint, so no other option is needed;
  2. a state_dict (torch.save(model.state_dict(), path); also {"state_dict": ...} or
     {"model": ...}) with --network naming the class that builds the network and
     --network-kwargs its arguments as JSON, e.g. a MONAI UNet:
       atso-fast export unet.pt pkg/ --window 96 96 96 --classes 3 \
         --network monai.networks.nets:UNet --network-kwargs '{"spatial_dims": 3,
         "in_channels": 1, "out_channels": 3, "channels": [16, 32, 64, 128, 256],
         "strides": [2, 2, 2, 2], "num_res_units": 2}'
     (the class is imported from your installed packages; the file still loads as tensors only);
  3. a pickled torch.nn.Module saved with torch.save(model, path), only with --trust-pickle:
     loading a pickle runs code from the file, so only do this for a file you made yourself;
     give --window and --classes.
Checkpoints are read with torch.load(weights_only=True), which loads tensors and plain
containers only; anything else is refused unless --trust-pickle."""


def load_checkpoint(
    path: Path, *, trust_pickle: bool = False, network: str | None = None, network_kwargs: dict[str, Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    """``(module, settings)`` from a checkpoint of a kind listed in the command's help.

    ``settings`` holds what the checkpoint records (``window``, ``num_classes``,
    ``in_channels``, ``normalization``); empty for a pickled module.

    Raises:
        PackageError: not a checkpoint of those kinds, or a pickle without ``trust_pickle``.
    """
    import torch

    try:
        data = read_regular_file(path)
    except InputError as exc:
        raise PackageError(str(exc)) from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise PackageError(
                f"{path}: holds pickled Python objects beyond tensors (a pickled nn.Module?): "
                f"{one_line(str(exc))[:160]}. Loading it would run code from the file; pass "
                "--trust-pickle only if you made this file yourself"
            ) from None
        obj = _load_pickle(data, path)
    except Exception as exc:  # noqa: BLE001 - corrupt zip, not a torch file, ...
        raise PackageError(f"{path}: not a torch checkpoint ({type(exc).__name__}: {one_line(str(exc))})") from None
    if isinstance(obj, torch.nn.Module):
        return obj, {}
    if network is not None:
        return _from_state_dict(obj, path, network, network_kwargs or {}), {}
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict) and isinstance(obj.get("model"), dict):
        return _from_training_checkpoint(obj, path)
    raise PackageError(
        f"{path}: a {type(obj).__name__}, not an atso-fast training checkpoint (a dict with "
        "'config' and 'model', as runs/<method>/checkpoint.pt) or a pickled nn.Module; a "
        "state_dict needs --network MODULE:CLASS and --network-kwargs (see --help)"
    )


def _from_state_dict(obj: Any, path: Path, network: str, kwargs: dict[str, Any]) -> Any:
    """``network(**kwargs)`` with the weights of the state_dict ``obj`` (strict: every name must match)."""
    import torch

    weights = obj
    for key in ("state_dict", "model", "network_weights"):
        if isinstance(weights, dict) and isinstance(weights.get(key), dict):
            weights = weights[key]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise PackageError(f"{path}: not a state_dict (a mapping of names to tensors)")
    module = _build_network(network, kwargs)
    try:
        module.load_state_dict(weights)
    except RuntimeError as exc:
        raise PackageError(f"{path}: its weights do not fit {network}({kwargs}): {one_line(str(exc))[:300]}") from None
    return module.eval()


def _build_network(network: str, kwargs: dict[str, Any]) -> Any:
    module_name, _, attr = network.partition(":")
    if not module_name or not attr:
        raise PackageError(f"--network must be MODULE:CLASS (e.g. monai.networks.nets:UNet), got {network!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PackageError(f"--network {network}: cannot import it ({exc})") from None
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise PackageError(f"--network {network}: cannot build it with --network-kwargs {kwargs} ({exc})") from None


def _load_pickle(data: bytes, path: Path) -> Any:
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - whatever the pickle raises
        raise PackageError(f"{path}: cannot unpickle ({type(exc).__name__}: {one_line(str(exc))})") from None


def _from_training_checkpoint(obj: dict[str, Any], path: Path) -> tuple[Any, dict[str, Any]]:
    """The U-Net of an ``ATSO`` state (``atso_fast.train.atso.ATSO.state_dict``) and its settings."""
    try:
        config = ATSOConfig.coerce(obj["config"])
        model = build_model(config)
        model.load_state_dict(obj["model"])
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise PackageError(f"{path}: training checkpoint does not match its config ({one_line(str(exc))})") from None
    norm = config.normalization if isinstance(config.normalization, dict) else None
    return model.eval(), {
        "window": list(config.patch_size),
        "num_classes": config.num_classes,
        "in_channels": config.in_channels,
        "normalization": norm,
        "spacing": config.spacing,
        "class_names": config.class_names,
    }


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``atso-fast export``."""
    ap = make_parser("atso-fast export", _DESCRIPTION)
    ap.add_argument("checkpoint", type=Path, help="checkpoint file (see the kinds above)")
    ap.add_argument("out_dir", type=Path, help="package folder to write (created)")
    ap.add_argument("--window", type=int, nargs="+", help="patch size (default: the checkpoint's)")
    ap.add_argument("--classes", type=int, help="output channels (default: the checkpoint's)")
    ap.add_argument("--in-channels", type=int, help="input channels (default: the checkpoint's, else 1)")
    ap.add_argument("--kind", choices=["logits", "probabilities"], default="logits", help="what the network outputs")
    ap.add_argument(
        "--normalization", help='JSON intensity policy, e.g. \'{"scheme": "zscore"}\' (default: the checkpoint\'s)'
    )
    ap.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        metavar="MM",
        help="spacing the network was trained at, z y x in mm (y x for a 2D model keeps z); "
        "scans are resampled to it and the labels back (default: the checkpoint's, else none)",
    )
    ap.add_argument(
        "--orientation",
        choices=["as-stored", "RAS"],
        help="as-stored (nnU-Net's way, default) or RAS (reorient to canonical, as MONAI)",
    )
    ap.add_argument("--class-names", nargs="+", metavar="NAME", help="one name per class (default: none)")
    ap.add_argument("--crop-to-nonzero", action="store_true", help="crop scans to their nonzero box (nnU-Net)")
    ap.add_argument("--grid", choices=["monai", "nnunet"], help="window grid and gaussian profile (default: monai)")
    ap.add_argument(
        "--network",
        metavar="MODULE:CLASS",
        help="build the network with this class and load a state_dict checkpoint into it "
        "(e.g. monai.networks.nets:UNet; default: none)",
    )
    ap.add_argument(
        "--network-kwargs", metavar="JSON", default="{}", help="the --network class's arguments as a JSON object"
    )
    ap.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a pickled nn.Module (runs code from the file: only for files you made)",
    )
    ap.add_argument(
        "--no-measure",
        action="store_true",
        help="do not measure the runtimes' agreement and speed on this machine after writing the package "
        "(atso-fast measure does it later; without a record, auto follows its rule; default: measure)",
    )
    ap.add_argument(
        "--measure-scan",
        type=Path,
        metavar="SCAN",
        help="measure on real windows of this scan (default: seeded random normalised windows)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    """``atso-fast export CHECKPOINT OUT_DIR [--window Z Y X] [--classes C] ...``."""
    args = build_parser().parse_args(argv)
    try:
        kwargs = json.loads(args.network_kwargs)
        if not isinstance(kwargs, dict):
            raise PackageError(f"--network-kwargs must be a JSON object, got {args.network_kwargs!r}")
        module, cfg = load_checkpoint(
            args.checkpoint, trust_pickle=args.trust_pickle, network=args.network, network_kwargs=kwargs
        )
        window = args.window or cfg.get("window")
        classes = args.classes or cfg.get("num_classes")
        if window is None or classes is None:
            raise PackageError("--window and --classes are required for a checkpoint that does not record them")
        norm = json.loads(args.normalization) if args.normalization else cfg.get("normalization")
        spec = {k: v for k, v in (("crop_to_nonzero", args.crop_to_nonzero or None), ("grid", args.grid)) if v}
        out = export_model(
            module,
            args.out_dir,
            window=window,
            num_classes=classes,
            kind=args.kind,
            normalization=norm,
            in_channels=args.in_channels or cfg.get("in_channels", 1),
            spacing=args.spacing or cfg.get("spacing"),
            orientation=args.orientation,
            class_names=args.class_names or cfg.get("class_names"),
            preprocessing=spec or None,
        )
    except (PackageError, OSError, ValueError) as exc:
        print(f"atso-fast export: {one_line(str(exc))}", file=sys.stderr)
        return 2
    if not args.no_measure:
        measure_after_writing(out, args.measure_scan, "atso-fast export")
    print(json.dumps(load_package(out).to_json()))
    return 0
