"""Export a torch segmentation network to an ONNX model package (``model.onnx`` + ``model.json``).

The ONNX graph has a static window and a dynamic batch axis. Export is verified: the graph
passes ``onnx.checker``, and one random batch is run through ONNX Runtime and PyTorch; the
largest absolute difference is recorded in ``model.json`` and export fails above ``tolerance``.
A ``torch.export`` program (``model.pt2``) is saved beside it when possible, so the ``torch``
runtime can run the package without the original Python class.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from atso_fast.io import atomic_write_bytes
from atso_fast.normalize import check_policy

__all__ = ["ModelPackage", "export_model", "load_package", "PackageError", "cli_main"]

FORMAT_VERSION = 1


class PackageError(ValueError):
    """A model package is missing, unreadable or inconsistent."""


@dataclass
class ModelPackage:
    """A validated model package (see ``atso_fast/CONTRACTS.md``)."""

    root: Path | None
    window: tuple[int, ...]
    in_channels: int
    num_classes: int
    kind: str = "logits"
    normalization: dict[str, Any] = field(default_factory=lambda: {"scheme": "none"})
    spacing: list[float] | None = None
    class_names: list[str] | None = None
    onnx_file: str | None = "model.onnx"
    torch_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_dims(self) -> int:
        return len(self.window)

    @property
    def window3d(self) -> tuple[int, int, int]:
        """The window as a 3D ``(pz, py, px)``; 2D networks run through ``(1, py, px)``."""
        return tuple(self.window) if len(self.window) == 3 else (1, *self.window)  # type: ignore[return-value]

    @property
    def onnx_path(self) -> Path:
        if self.root is None or self.onnx_file is None:
            raise PackageError("this model has no ONNX file (built from a live torch module)")
        return self.root / self.onnx_file

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "spatial_dims": self.spatial_dims, "window": list(self.window),
                "in_channels": self.in_channels, "num_classes": self.num_classes, "kind": self.kind,
                "normalization": self.normalization, "spacing": self.spacing, "class_names": self.class_names,
                "onnx_file": self.onnx_file, "torch_file": self.torch_file, **self.extra}


def _validate_meta(window, in_channels, num_classes, kind, normalization, where: str) -> tuple:
    try:
        win = tuple(int(w) for w in window)
    except (TypeError, ValueError):
        raise PackageError(f"{where}: window must be 2 or 3 integers, got {window!r}") from None
    if len(win) not in (2, 3) or min(win) < 1:
        raise PackageError(f"{where}: window must be 2 or 3 positive integers, got {window!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise PackageError(f"{where}: in_channels must be a positive integer, got {in_channels!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise PackageError(f"{where}: num_classes must be a positive integer, got {num_classes!r}")
    if kind not in ("logits", "probabilities"):
        raise PackageError(f"{where}: kind must be 'logits' or 'probabilities', got {kind!r}")
    try:
        norm = check_policy(normalization)
    except ValueError as exc:
        raise PackageError(f"{where}: {exc}") from None
    return win, norm


def load_package(model_dir: str | os.PathLike) -> ModelPackage:
    """Read and validate ``model_dir/model.json`` (and that its ONNX file exists).

    Raises:
        PackageError: naming the file and the problem.
    """
    root = Path(model_dir)
    meta_path = root / "model.json"
    if not meta_path.is_file():
        raise PackageError(f"{meta_path}: not found (a model package is a folder with model.json + model.onnx)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{meta_path}: unreadable JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"{meta_path}: format_version must be {FORMAT_VERSION}, got {meta.get('format_version')!r}"
                           if isinstance(meta, dict) else f"{meta_path}: must hold a JSON object")
    win, norm = _validate_meta(meta.get("window"), meta.get("in_channels"), meta.get("num_classes"),
                               meta.get("kind"), meta.get("normalization"), str(meta_path))
    known = {"format_version", "spatial_dims", "window", "in_channels", "num_classes", "kind", "normalization",
             "spacing", "class_names", "onnx_file", "torch_file"}
    pkg = ModelPackage(root, win, meta["in_channels"], meta["num_classes"], meta["kind"], norm,
                       meta.get("spacing"), meta.get("class_names"), meta.get("onnx_file") or "model.onnx",
                       meta.get("torch_file"), {k: v for k, v in meta.items() if k not in known})
    if not pkg.onnx_path.is_file():
        raise PackageError(f"{pkg.onnx_path}: ONNX file named in {meta_path} not found")
    return pkg


def _onnx_bytes(module, example, opset: int) -> bytes:
    """ONNX bytes with a dynamic batch axis: torch's dynamo exporter, else the legacy one."""
    import torch

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter is not the user's concern
        path = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(module, (example,), str(path), input_names=["image"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                              opset_version=max(opset, 18), dynamo=True, verbose=False, external_data=False)
        except Exception:  # noqa: BLE001 - some modules only trace with the legacy exporter
            torch.onnx.export(module, (example,), str(path), input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=opset, dynamo=False)
        return path.read_bytes()


def _verify_onnx(data: bytes, module, example, tolerance: float) -> float:
    import onnx
    import onnxruntime as ort
    import torch

    onnx.checker.check_model(onnx.load_from_string(data))
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    batch = torch.cat([example, torch.randn_like(example)])
    got = session.run(None, {"image": batch.numpy()})[0]
    with torch.no_grad():
        want = module(batch).float().numpy()
    if got.shape != want.shape:
        raise PackageError(f"ONNX output shape {got.shape} differs from PyTorch's {want.shape}")
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    if not diff <= tolerance:
        raise PackageError(f"ONNX Runtime and PyTorch disagree: max abs difference {diff:.3g} > {tolerance:g}")
    return diff


def _torch_program(module, example) -> bytes | None:
    """A ``torch.export`` program, or None when the module cannot be exported that way."""
    import torch

    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(module, (example.expand(2, *example.shape[1:]).contiguous(),),
                                      dynamic_shapes=({0: batch},))
        buf = io.BytesIO()
        torch.export.save(program, buf)
        return buf.getvalue()
    except Exception:  # noqa: BLE001 - optional artefact: ONNX is the package's contract
        return None


def export_model(module, out_dir: str | os.PathLike, *, window, num_classes: int, kind: str = "logits",
                 normalization: dict[str, Any] | None = None, in_channels: int = 1,
                 spacing: list[float] | None = None, class_names: list[str] | None = None,
                 opset: int = 17, tolerance: float = 1e-3, save_torch: bool = True) -> Path:
    """Export ``module`` to a verified model package in ``out_dir``; returns ``out_dir``.

    Args:
        module: network mapping ``(B, M, *window)`` to ``(B, C, *window)`` (3D or 2D).
        out_dir: package folder (created; existing files are replaced atomically).
        window: ``(pz, py, px)`` or ``(py, px)`` patch size the network runs on.
        num_classes: output channels C (1 means a sigmoid foreground channel).
        kind: ``"logits"`` or ``"probabilities"``.
        normalization: intensity policy (``atso_fast.normalize``), stored for inference.
        in_channels: input channels M.
        tolerance: maximum |ONNX Runtime - PyTorch| accepted on a random batch.

    Raises:
        PackageError: bad metadata, output shape mismatch, or ONNX/PyTorch disagreement.
    """
    import torch

    win, norm = _validate_meta(window, in_channels, num_classes, kind, normalization, "export_model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Export a float32 CPU copy: the caller's module keeps its device, dtype and mode.
    cpu_module = copy.deepcopy(module).to("cpu").float().eval()
    example = torch.randn(1, in_channels, *win)
    with torch.no_grad():
        probe = cpu_module(example)
    if tuple(probe.shape) != (1, num_classes, *win):
        raise PackageError(f"export_model: network maps {tuple(example.shape)} to {tuple(probe.shape)}, "
                           f"expected {(1, num_classes, *win)}")
    data = _onnx_bytes(cpu_module, example, opset)
    diff = _verify_onnx(data, cpu_module, example, tolerance)
    program = _torch_program(cpu_module, example) if save_torch else None
    atomic_write_bytes(out / "model.onnx", data)
    if program is not None:
        atomic_write_bytes(out / "model.pt2", program)
    from atso_fast import __version__

    pkg = ModelPackage(out, win, in_channels, num_classes, kind, norm, spacing, class_names, "model.onnx",
                       "model.pt2" if program is not None else None,
                       {"onnx_sha256": hashlib.sha256(data).hexdigest(), "onnx_max_abs_diff": diff,
                        "atso_fast_version": __version__})
    atomic_write_bytes(out / "model.json", (json.dumps(pkg.to_json(), indent=2) + "\n").encode())
    return out


def _load_checkpoint_module(path: Path):
    """A module from a checkpoint: a pickled ``nn.Module`` (trusted file) or an atso-fast
    training checkpoint holding ``model_config`` + ``model_state``."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, torch.nn.Module):
        return obj, {}
    if isinstance(obj, dict) and "model_state" in obj and "model_config" in obj:
        from atso_fast.train.unet import build_model

        model = build_model(obj["model_config"])
        model.load_state_dict(obj["model_state"])
        return model, obj
    raise PackageError(f"{path}: expected a pickled torch.nn.Module or an atso-fast checkpoint "
                       "with model_config/model_state")


def cli_main(argv: list[str] | None = None) -> int:
    """``atso-fast export CHECKPOINT OUT_DIR [--window Z Y X] [--classes C] ...``."""
    ap = argparse.ArgumentParser(prog="atso-fast export", description=cli_main.__doc__)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--window", type=int, nargs="+", help="patch size (defaults to the checkpoint's)")
    ap.add_argument("--classes", type=int, help="output channels (defaults to the checkpoint's)")
    ap.add_argument("--in-channels", type=int)
    ap.add_argument("--kind", choices=["logits", "probabilities"], default="logits")
    ap.add_argument("--normalization", help="JSON policy, e.g. '{\"scheme\": \"zscore\"}'")
    args = ap.parse_args(argv)
    try:
        module, ckpt = _load_checkpoint_module(args.checkpoint)
        cfg = ckpt.get("package", {}) if isinstance(ckpt, dict) else {}
        window = args.window or cfg.get("window")
        classes = args.classes or cfg.get("num_classes")
        if window is None or classes is None:
            raise PackageError("--window and --classes are required for a checkpoint that does not record them")
        norm = json.loads(args.normalization) if args.normalization else cfg.get("normalization")
        out = export_model(module, args.out_dir, window=window, num_classes=classes, kind=args.kind,
                           normalization=norm, in_channels=args.in_channels or cfg.get("in_channels", 1))
    except (PackageError, OSError, ValueError) as exc:
        print(f"atso-fast export: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(load_package(out).to_json()))
    return 0
