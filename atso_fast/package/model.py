"""The model package: ``model.json`` + ``model.onnx`` (+ ``model.pt2``), validated on load.

A package is untrusted input: ``load_package`` validates every field and names the file and the
problem in a :class:`PackageError` (see ``atso_fast/CONTRACTS.md`` for the format).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atso_fast.package.errors import PackageError
from atso_fast.package.normalize import channels_of, check_policy
from atso_fast.package.spec import check_fields, default_preprocessing
from atso_fast.package.trust import read_meta, read_torch_program, verify_package

__all__ = [
    "FORMAT_VERSION",
    "MAX_CLASSES",
    "MAX_WINDOW_VOXELS",
    "ModelPackage",
    "PackageError",
    "load_package",
    "validate_fields",
    "validate_meta",
]

FORMAT_VERSION = 1
MAX_WINDOW_VOXELS = 256**3
"""Largest network window (nnU-Net's patches stay far below; 512^3 only exhausts memory)."""
MAX_CLASSES = 65535
"""Most classes a package may declare: labels are stored as uint16 at most."""


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
    preprocessing: dict[str, Any] = field(default_factory=default_preprocessing)
    mirror_axes: list[int] | None = None
    verified: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    """The bytes of ``model.onnx`` (``"onnx"``, checked by
    :func:`~atso_fast.package.trust.verify_package`) and ``model.pt2`` (``"torch"``, read when the
    torch runtime first asks, :meth:`torch_bytes`): runtimes load these, never the files again (a
    file swapped after the check never runs)."""

    digests: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """``hashlib.sha256`` objects of the verified bytes (``"onnx"``), computed once by
    ``load_package``: the run fingerprint and the compiled-model caches extend copies."""
    torch_screened: bool = field(default=False, repr=False, compare=False)
    """``model.pt2`` passed :func:`~atso_fast.io.pt2.screen_torch_archive` (a torch program)."""

    def onnx_sha256(self) -> Any:
        """A fresh ``hashlib.sha256`` object that has consumed the verified ONNX bytes."""
        if "onnx" not in self.digests:
            self.digests["onnx"] = hashlib.sha256(self.onnx_bytes())
        return self.digests["onnx"].copy()

    def torch_bytes(self) -> bytes:
        """``model.pt2``'s bytes, read and hash-checked on first use (see
        :func:`~atso_fast.package.trust.read_torch_program`).

        Raises:
            PackageError: no torch program in this package, or a file that fails the checks.
        """
        if "torch" not in self.verified:
            if self.root is None or not self.torch_file:
                raise PackageError("this model package has no torch program (model.pt2)")
            self.verified["torch"] = read_torch_program(self)
        return self.verified["torch"]

    def onnx_bytes(self) -> bytes:
        """The verified ONNX bytes.

        Raises:
            PackageError: the package was not loaded by :func:`load_package` (no verified bytes).
        """
        if "onnx" not in self.verified:
            raise PackageError(f"{self.onnx_path}: not verified (load the package with load_package)")
        return self.verified["onnx"]

    @property
    def spatial_dims(self) -> int:
        return len(self.window)

    @property
    def window3d(self) -> tuple[int, int, int]:
        """The window as a 3D ``(pz, py, px)``; 2D networks run through ``(1, py, px)``."""
        w = self.window
        if len(w) == 3:
            return w[0], w[1], w[2]
        if len(w) == 2:
            return 1, w[0], w[1]
        raise ValueError(f"window must have 2 or 3 entries, got {w!r}")

    @property
    def reference(self) -> str | None:
        """The predictor whose labels this package promises to reproduce (``"nnunetv2"`` for an
        imported nnU-Net model), or None; ``model.json``'s ``source.kind``."""
        source = self.extra.get("source")
        kind = source.get("kind") if isinstance(source, dict) else None
        return kind if isinstance(kind, str) else None

    @property
    def onnx_path(self) -> Path:
        if self.root is None or self.onnx_file is None:
            raise PackageError("this model has no ONNX file (built from a live torch module)")
        return self.root / self.onnx_file

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "spatial_dims": self.spatial_dims,
            "window": list(self.window),
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "kind": self.kind,
            "normalization": self.normalization,
            "spacing": self.spacing,
            "class_names": self.class_names,
            "mirror_axes": self.mirror_axes,
            "preprocessing": self.preprocessing,
            "onnx_file": self.onnx_file,
            "torch_file": self.torch_file,
            **self.extra,
        }


def validate_meta(window, in_channels, num_classes, kind, normalization, where: str) -> tuple:
    """``(window tuple, normalisation policy)`` checked; ``where`` prefixes every error message."""
    try:
        win = tuple(int(w) for w in window)
    except (TypeError, ValueError):
        raise PackageError(f"{where}: window must be 2 or 3 integers, got {window!r}") from None
    if len(win) not in (2, 3) or min(win) < 1:
        raise PackageError(f"{where}: window must be 2 or 3 positive integers, got {window!r}")
    if math.prod(win) > MAX_WINDOW_VOXELS:
        raise PackageError(
            f"{where}: window {list(win)} holds {math.prod(win)} voxels, more than the "
            f"{MAX_WINDOW_VOXELS} (256^3) a network window may have; refused"
        )
    if not isinstance(in_channels, int) or in_channels < 1:
        raise PackageError(f"{where}: in_channels must be a positive integer, got {in_channels!r}")
    if not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
        raise PackageError(
            f"{where}: num_classes must be an integer in [1, {MAX_CLASSES}] (uint16 label maps), got {num_classes!r}"
        )
    if kind not in ("logits", "probabilities"):
        raise PackageError(f"{where}: kind must be 'logits' or 'probabilities', got {kind!r}")
    try:
        norm = check_policy(normalization)
    except ValueError as exc:
        raise PackageError(f"{where}: {exc}") from None
    if isinstance(norm, list) and len(norm) != in_channels:
        raise PackageError(
            f"{where}: normalization lists {len(norm)} channel policies for {in_channels} input channel(s)"
        )
    wanted = [channels_of(p) for p in (norm if isinstance(norm, list) else [norm])]
    if isinstance(norm, list) and any(w not in (None, 1) for w in wanted):
        raise PackageError(f"{where}: a per-channel 'rgb' policy must hold one mean and one std, got {norm!r}")
    if not isinstance(norm, list) and wanted[0] not in (None, in_channels):
        raise PackageError(
            f"{where}: normalization 'rgb' has {wanted[0]} channel statistics for {in_channels} input channel(s)"
        )
    return win, norm


def validate_fields(meta: dict[str, Any], spatial_dims: int, num_classes: int, where: str) -> dict[str, Any]:
    """``spacing``, ``class_names``, ``mirror_axes`` and ``preprocessing`` checked
    (``atso_fast.package.spec``); ``where`` prefixes every error message."""
    try:
        return check_fields(meta, spatial_dims, num_classes, where)
    except ValueError as exc:
        raise PackageError(str(exc)) from None


def load_package(model_dir: str | os.PathLike) -> ModelPackage:
    """Read and validate ``model_dir/model.json`` and the files it names (untrusted input: see
    :mod:`atso_fast.package.trust` for the path, hash, graph-shape and torch-program checks).

    Raises:
        PackageError: naming the file and the problem.
    """
    root = Path(model_dir)
    meta_path, meta = read_meta(root)
    if meta.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"{meta_path}: format_version must be {FORMAT_VERSION}, got {meta.get('format_version')!r}")
    win, norm = validate_meta(
        meta.get("window"),
        meta.get("in_channels"),
        meta.get("num_classes"),
        meta.get("kind"),
        meta.get("normalization"),
        str(meta_path),
    )
    fields = validate_fields(meta, len(win), meta["num_classes"], str(meta_path))
    known = {
        "format_version",
        "spatial_dims",
        "window",
        "in_channels",
        "num_classes",
        "kind",
        "normalization",
        "spacing",
        "class_names",
        "onnx_file",
        "torch_file",
        "mirror_axes",
        "preprocessing",
    }
    pkg = ModelPackage(
        root,
        win,
        meta["in_channels"],
        meta["num_classes"],
        meta["kind"],
        norm,
        fields["spacing"],
        fields["class_names"],
        meta.get("onnx_file") or "model.onnx",
        meta.get("torch_file"),
        {k: v for k, v in meta.items() if k not in known},
        fields["preprocessing"],
        fields["mirror_axes"],
    )
    verify_package(pkg, meta, meta_path)
    return pkg
