"""Export a torch segmentation network to an ONNX model package (``model.onnx`` + ``model.json``).

The ONNX graph has a static window and a dynamic batch axis. Export is verified: the graph
passes ``onnx.checker``, and one random batch is run through ONNX Runtime and PyTorch; the
largest absolute difference is recorded in ``model.json`` and export fails above ``tolerance``.
A ``torch.export`` program (``model.pt2``) is saved beside it when possible, so the ``torch``
runtime can run the package without the original Python class.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from atso_fast import __version__
from atso_fast.io.atomic import atomic_write_bytes
from atso_fast.package.model import (
    ModelPackage,
    PackageError,
    validate_fields,
    validate_meta,
)

__all__ = ["export_model"]

log = logging.getLogger(__name__)


def _onnx_bytes(module, example, opset: int) -> bytes:
    """ONNX bytes with a dynamic batch axis: torch's dynamo exporter, else the legacy one."""
    import torch

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter is not the user's concern
        path = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                opset_version=max(opset, 18),
                dynamo=True,
                verbose=False,
                external_data=False,
            )
        except Exception:  # noqa: BLE001 - some modules only trace with the legacy exporter
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
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
        program = torch.export.export(
            module, (example.expand(2, *example.shape[1:]).contiguous(),), dynamic_shapes=({0: batch},)
        )
        buf = io.BytesIO()
        torch.export.save(program, buf)
        return buf.getvalue()
    except Exception as exc:  # noqa: BLE001 - optional artefact: ONNX is the package's contract
        log.warning(
            "no model.pt2: torch.export could not export %s (%s: %s); the package runs on ONNX Runtime/OpenVINO",
            type(module).__name__,
            type(exc).__name__,
            str(exc).splitlines()[0][:200],
        )
        return None


def export_model(
    module,
    out_dir: str | os.PathLike,
    *,
    window,
    num_classes: int,
    kind: str = "logits",
    normalization: dict[str, Any] | None = None,
    in_channels: int = 1,
    spacing: list[float] | None = None,
    class_names: list[str] | None = None,
    orientation: str | None = None,
    preprocessing: dict[str, Any] | None = None,
    mirror_axes: list[int] | None = None,
    extra: dict[str, Any] | None = None,
    opset: int = 17,
    tolerance: float = 1e-3,
    save_torch: bool = True,
) -> Path:
    """Export ``module`` to a verified model package in ``out_dir``; returns ``out_dir``.

    Args:
        module: network mapping ``(B, M, *window)`` to ``(B, C, *window)`` (3D or 2D).
        out_dir: package folder (created; existing files are replaced atomically).
        window: ``(pz, py, px)`` or ``(py, px)`` patch size the network runs on.
        num_classes: output channels C (1 means a sigmoid foreground channel).
        kind: ``"logits"`` or ``"probabilities"``.
        normalization: intensity policy (``atso_fast.package.normalize``), stored for inference; a list
            holds one policy per input channel.
        in_channels: input channels M.
        spacing: the spacing (mm, ``(z, y, x)``; ``(y, x)`` for a 2D model keeps z) the network
            was trained at: scans are resampled to it and the output back (``None``: scans run
            at their own resolution).
        class_names: one name per class (``max(C, 2)`` for a sigmoid channel), or ``None``.
        orientation: ``"as-stored"`` (nnU-Net) or ``"RAS"`` (MONAI/TotalSegmentator);
            shorthand for ``preprocessing["orientation"]``.
        preprocessing: the rest of the preprocessing spec (``atso_fast.package.spec``: transpose,
            crop to nonzero, resampling orders and anisotropy rule, window grid profile).
        mirror_axes: spatial axes test-time mirroring may flip (``None``: all).
        extra: further JSON fields stored in ``model.json`` (e.g. where the model came from).
        tolerance: maximum |ONNX Runtime - PyTorch| accepted on a random batch.

    Raises:
        PackageError: bad metadata, output shape mismatch, or ONNX/PyTorch disagreement.
    """
    import torch

    win, norm = validate_meta(window, in_channels, num_classes, kind, normalization, "export_model")
    spec = dict(preprocessing or {})
    if orientation is not None:
        spec["orientation"] = orientation
    fields = validate_fields(
        {"spacing": spacing, "class_names": class_names, "mirror_axes": mirror_axes, "preprocessing": spec},
        len(win),
        num_classes,
        "export_model",
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Export a float32 CPU copy: the caller's module keeps its device, dtype and mode.
    cpu_module = copy.deepcopy(module).to("cpu").float().eval()
    example = torch.randn(1, in_channels, *win)
    with torch.no_grad():
        probe = cpu_module(example)
    if tuple(probe.shape) != (1, num_classes, *win):
        raise PackageError(
            f"export_model: network maps {tuple(example.shape)} to {tuple(probe.shape)}, "
            f"expected {(1, num_classes, *win)}"
        )
    data = _onnx_bytes(cpu_module, example, opset)
    diff = _verify_onnx(data, cpu_module, example, tolerance)
    program = _torch_program(cpu_module, example) if save_torch else None
    atomic_write_bytes(out / "model.onnx", data)
    if program is not None:
        atomic_write_bytes(out / "model.pt2", program)
    pkg = ModelPackage(
        out,
        win,
        in_channels,
        num_classes,
        kind,
        norm,
        fields["spacing"],
        fields["class_names"],
        "model.onnx",
        "model.pt2" if program is not None else None,
        {
            **(extra or {}),
            "onnx_sha256": hashlib.sha256(data).hexdigest(),
            "onnx_max_abs_diff": diff,
            "atso_fast_version": __version__,
            **({"torch_sha256": hashlib.sha256(program).hexdigest()} if program is not None else {}),
        },
        fields["preprocessing"],
        fields["mirror_axes"],
    )
    atomic_write_bytes(out / "model.json", (json.dumps(pkg.to_json(), indent=2) + "\n").encode())
    return out
