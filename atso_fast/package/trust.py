"""The checks that make a model package safe to load: it is untrusted input.

- Every file ``model.json`` names (``onnx_file``, ``torch_file``, any other ``*_file`` field) must
  be a regular file inside the package folder after links are resolved; ``model.json`` too.
- ``onnx_sha256`` / ``torch_sha256``, when recorded, must match the files (integrity against
  mix-ups and corruption; an attacker who writes the files also writes the hashes); ``model.pt2``
  is read whole and hashed only when the torch runtime loads it (:func:`read_torch_program`).
- The ONNX graph's input and output shapes must agree with ``window``, ``in_channels`` and
  ``num_classes`` (refused when the package loads, not per case); ONNX external data (files the
  graph names, outside the hash) is refused wherever a tensor sits (functions, sparse tensors,
  attributes, sub-graphs: every field is walked).
- The checked bytes are kept (``ModelPackage.verified``) and handed to the runtimes: a file
  swapped after the check never runs.
- ``model.pt2`` must pass :func:`atso_fast.io.pt2.screen_torch_archive` (nothing in it may run
  code; no torch import, the weights are not read), whichever runtime will run: a package that
  carries an unsafe program is refused; the torch runtime runs the full
  :func:`~atso_fast.io.pt2.check_torch_program` on the bytes it loads. A file
  that is no torch.export archive at all (say from another torch version) runs nothing and is
  left to the torch runtime to report (``auto`` then runs ONNX Runtime, with a warning).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from atso_fast.io.base import InputError
from atso_fast.io.files import not_regular_error, read_regular_file
from atso_fast.io.onnx_shapes import inferred_shapes
from atso_fast.io.pt2 import UnsafeArchiveError, screen_torch_archive
from atso_fast.package.check_cache import remembered
from atso_fast.package.errors import PackageError

__all__ = ["MAX_META_BYTES", "confined_file", "largest_tensor", "read_meta", "read_torch_program", "verify_package"]

MAX_META_BYTES = 16 * 1024 * 1024
"""``model.json`` above this size is refused (it is a small JSON object)."""


def read_meta(root: Path) -> tuple[Path, dict[str, Any]]:
    """``(path, object)`` of ``root/model.json``: a regular file inside ``root`` holding a JSON object.

    Raises:
        PackageError: naming the file and the problem (missing, a FIFO, outside, bad JSON, ...).
    """
    meta_path = root / "model.json"
    if not os.path.lexists(meta_path):
        raise PackageError(f"{meta_path}: not found (a model package is a folder with model.json + model.onnx)")
    confined_file(root, "model.json", "model.json", meta_path)
    try:
        meta = json.loads(read_regular_file(meta_path, max_bytes=MAX_META_BYTES).decode("utf-8"))
    except InputError as exc:
        raise PackageError(str(exc)) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise PackageError(f"{meta_path}: unreadable JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise PackageError(f"{meta_path}: must hold a JSON object")
    return meta_path, meta


@overload
def confined_file(root: Path, name: Any, field: str, meta_path: Path, *, required: Literal[True] = ...) -> Path: ...
@overload
def confined_file(root: Path, name: Any, field: str, meta_path: Path, *, required: bool) -> Path | None: ...
def confined_file(root: Path, name: Any, field: str, meta_path: Path, *, required: bool = True) -> Path | None:
    """``root / name`` when, after resolving links, it is a regular file inside ``root``.

    Args:
        required: a missing file is an error; otherwise ``None`` (an optional file such as
            ``model.pt2``, which runtimes then treat as absent). Confinement applies either way.

    Raises:
        PackageError: ``name`` is not a relative file name, resolves outside ``root``, is missing
            (when ``required``) or is not a regular file.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise PackageError(f"{meta_path}: {field} must be a file name inside the package, got {name!r}")
    if os.path.isabs(name):
        raise PackageError(f"{meta_path}: {field} {name!r} is an absolute path, outside the package folder {root}")
    real_root = os.path.realpath(root)
    real = os.path.realpath(root / name)
    if os.path.commonpath([real, real_root]) != real_root or real == real_root:
        raise PackageError(f"{meta_path}: {field} {name!r} resolves to {real}, outside the package folder {root}")
    path = root / name
    if not os.path.lexists(path) and not required:
        return None
    if not os.path.exists(path):
        raise PackageError(f"{path}: {field} named in {meta_path} not found")
    problem = not_regular_error(path)
    if problem:
        raise PackageError(f"{problem} ({field} in {meta_path})")
    return path


def verify_package(pkg: Any, meta: dict[str, Any], meta_path: Path) -> None:
    """Run every check of the module docstring on a package just read from ``meta_path``.

    Args:
        pkg: the :class:`~atso_fast.package.ModelPackage` built from ``meta`` (``root``,
            ``onnx_file``, ``torch_file``, ``window``, ``in_channels``, ``num_classes``).
        meta: the parsed ``model.json``.
        meta_path: its path, for messages.

    Raises:
        PackageError: naming the file and the problem.
    """
    root = Path(pkg.root)
    for field, value in meta.items():
        if field.endswith("_file") and value is not None and field not in ("onnx_file", "torch_file"):
            confined_file(root, value, field, meta_path)
    onnx_path = confined_file(root, pkg.onnx_file, "onnx_file", meta_path)
    data = _read(onnx_path)
    pkg.digests["onnx"] = hashlib.sha256(data)
    _check_hash(onnx_path, pkg.digests["onnx"].hexdigest(), meta.get("onnx_sha256"), "onnx_sha256", meta_path)
    remembered(  # a passed check, stored per ONNX hash: a second start skips onnx altogether
        "onnx-graph",
        [pkg.digests["onnx"].hexdigest(), list(pkg.window), pkg.in_channels, pkg.num_classes],
        lambda: _passed(check_onnx_graph, data, onnx_path, pkg, meta_path),
    )
    pkg.verified["onnx"] = data
    torch_path = (
        confined_file(root, pkg.torch_file, "torch_file", meta_path, required=False) if pkg.torch_file else None
    )
    if torch_path is not None:  # a missing model.pt2 only means the torch runtime is unavailable
        try:
            screen_torch_archive(torch_path, str(torch_path))
            pkg.torch_screened = True
        except UnsafeArchiveError as exc:
            raise PackageError(_unsafe_program(exc, torch_path, meta_path)) from None
        except InputError:  # not a torch program at all (another torch version?): nothing can run
            pass  # from it; the torch runtime reports it, and auto runs ONNX Runtime instead


def _passed(check: Any, *args: Any) -> bool:
    """True once ``check(*args)`` returns (it raises on failure): what the cache stores."""
    check(*args)
    return True


def read_torch_program(pkg: Any) -> bytes:
    """``model.pt2``'s bytes for the torch runtime, read once and checked against
    ``torch_sha256`` (``load_package`` only screened the file: runs on other runtimes never read
    its weights). :func:`~atso_fast.io.pt2.load_torch_program` runs the full check on them.

    Raises:
        PackageError: the file is gone, unreadable, or differs from its recorded hash.
    """
    meta_path = Path(pkg.root) / "model.json"
    path = confined_file(Path(pkg.root), pkg.torch_file, "torch_file", meta_path)
    data = _read(path)
    _check_hash(path, hashlib.sha256(data).hexdigest(), pkg.extra.get("torch_sha256"), "torch_sha256", meta_path)
    return data


def _unsafe_program(exc: Exception, torch_path: Path, meta_path: Path) -> str:
    """Could run code: refused whatever the runtime."""
    return (
        f"{exc} (to run this package with ONNX Runtime only, delete {torch_path.name} "
        f"and its torch_file entry in {meta_path.name})"
    )


def _read(path: Path) -> bytes:
    try:
        return read_regular_file(path)
    except InputError as exc:
        raise PackageError(str(exc)) from None


def _check_hash(path: Path, actual: str, expected: Any, field: str, meta_path: Path) -> None:
    if expected is None:
        return
    if not isinstance(expected, str) or actual != expected.lower():
        raise PackageError(
            f"{path}: sha256 {actual} differs from {field} {expected} recorded in {meta_path} "
            "(the file is corrupt, was replaced, or belongs to another package)"
        )


def check_onnx_graph(data: bytes, path: Path, pkg: Any, meta_path: Path) -> None:
    """The graph has one input ``(B, in_channels, *window)`` and its first output is
    ``(B, num_classes, *window)`` wherever the graph fixes a dimension; no external data.

    Raises:
        PackageError: not an ONNX model, external data, or a shape that disagrees with model.json.
    """
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError and friends
        raise PackageError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {exc})") from None
    if _uses_external_data(model):
        raise PackageError(
            f"{path}: the graph keeps weights in external data files, which are refused "
            "(re-export with the weights inside model.onnx)"
        )
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1 or not graph.output:
        raise PackageError(
            f"{path}: expected one input and at least one output, got {len(inputs)} inputs "
            f"and {len(graph.output)} outputs"
        )
    _check_dims(_dims(inputs[0]), "in_channels", pkg.in_channels, pkg, path, meta_path, f"input {inputs[0].name!r}")
    _check_dims(
        _dims(graph.output[0]), "num_classes", pkg.num_classes, pkg, path, meta_path, f"output {graph.output[0].name!r}"
    )


def _dims(value: Any) -> list[int | None] | None:
    """Fixed sizes of a graph value (``None`` for symbolic ones), or ``None`` when unknown."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]


def _check_dims(
    dims: list[int | None] | None, field: str, channels: int, pkg: Any, path: Path, meta_path: Path, what: str
) -> None:
    if dims is None:
        return
    window = tuple(pkg.window)
    shown = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
    if len(dims) != 2 + len(window):
        raise PackageError(
            f"{meta_path}: window {list(window)} ({len(window)}D) disagrees with {path}: its {what} has shape {shown}"
        )
    if dims[1] is not None and dims[1] != channels:
        raise PackageError(
            f"{meta_path}: {field} {channels} disagrees with {path}: its {what} has {dims[1]} channels (shape {shown})"
        )
    if any(d is not None and d != w for d, w in zip(dims[2:], window)):
        raise PackageError(f"{meta_path}: window {list(window)} disagrees with {path}: its {what} has shape {shown}")


def largest_tensor(data: bytes, batch: int) -> tuple[str, int]:
    """``(name, bytes)`` of the largest tensor the ONNX graph ``data`` computes for a batch of
    ``batch`` windows, from ONNX shape inference (with constant propagation); tensors whose
    shape stays unknown count as 0. A graph that allocates gigabytes inside (a
    ``ConstantOfShape`` of 6 GiB, say) is found before any runtime runs it."""
    import onnx

    best = ("", 0)
    for name, (elem_type, dims) in inferred_shapes(data, {0: int(batch)}).items():
        known = [d for d in dims if d is not None]
        if len(known) != len(dims):
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize if elem_type else 4
        size = itemsize * int(np.prod(known, dtype=np.float64))
        best = max(best, (name, size), key=lambda item: item[1])
    return best


def _uses_external_data(message: Any) -> bool:
    """Whether any tensor anywhere in ``message`` (an ONNX ``ModelProto``: initializers, sparse
    initializers and their values and indices, node attributes, sub-graphs, model-local functions,
    training info) lives in an external file. Walks every set message field by protobuf
    reflection, so no place a tensor can hide is missed."""
    import onnx

    if isinstance(message, onnx.TensorProto) and (
        message.data_location == onnx.TensorProto.EXTERNAL or len(message.external_data) > 0
    ):
        return True
    for descriptor, value in message.ListFields():
        if descriptor.type != descriptor.TYPE_MESSAGE:
            continue
        items = value if _repeated(descriptor) else [value]
        if any(_uses_external_data(item) for item in items):
            return True
    return False


def _repeated(descriptor: Any) -> bool:
    """Whether a protobuf field is repeated (``is_repeated`` in protobuf >= 5.27, ``label`` before)."""
    flag = getattr(descriptor, "is_repeated", None)
    return bool(flag) if flag is not None else descriptor.label == descriptor.LABEL_REPEATED
