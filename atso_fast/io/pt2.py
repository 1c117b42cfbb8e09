"""Loading a ``torch.export`` archive (``model.pt2``) from an untrusted package without running
code from it.

``torch.export.load`` is not safe on untrusted files (its own docstring says so). Reading
torch 2.13's loader, an archive can make it run code in these ways, and each is refused here
before ``torch.export.load`` sees the bytes:

- pickles: weights or constants marked ``use_pickle`` (``torch.load(weights_only=False)``),
  ``custom_obj_*`` / ``opaque_obj_*`` constants (``pickle.loads``), legacy ``*.pt`` state files,
  and sample inputs that only load with ``weights_only=False`` (torch retries them that way);
- native code: AOTInductor/ExecuTorch/MTIA members (shared libraries), so any member outside
  the short list ``torch.export.save`` writes is refused;
- Python source: ``guards_code`` strings are ``exec``-ed by ``.module()``, symbolic
  expressions (``expr_str``) go through ``sympy.sympify`` (an ``eval``), and names, targets and
  stack traces are pasted into the source FX generates and ``exec``-s. So ``guards_code`` must
  be empty, expressions must be plain sympy constructor calls (checked on their syntax tree),
  graph calls must be ATen operators (or a few ``operator``/shape helpers), names must be
  identifiers, and no string may hold a control character that ends a line of source;
- graph inputs other than tensors (string inputs become ``'...'`` literals in generated guards)
  and sub-graphs or custom objects (higher-order operators).

The same bytes that were checked are handed to ``torch.export.load`` (no second read of the
file), and the archive is read with torch's own zip reader, so the checks see the members the
loader will see; the Python ``zipfile`` view must agree (torch falls back to it for old archives).
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickletools
import re
import warnings
import zipfile
from collections.abc import Callable, Collection, Iterator
from typing import Any

from atso_fast.io.base import InputError

__all__ = ["UnsafeArchiveError", "check_torch_program", "load_torch_program", "screen_torch_archive"]


class UnsafeArchiveError(InputError):
    """A ``model.pt2`` holds something that could run code when loaded (never a fallback case)."""


_MEMBERS = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+)"
)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTTED = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_ATEN = re.compile(r"torch\.ops\.aten\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")
_HELPERS = frozenset(
    [
        f"_operator.{op}"
        for op in (
            "getitem",
            "add",
            "sub",
            "mul",
            "floordiv",
            "truediv",
            "mod",
            "neg",
            "pos",
            "pow",
            "eq",
            "ne",
            "lt",
            "le",
            "gt",
            "ge",
            "and_",
            "or_",
            "not_",
            "abs",
        )
    ]
    + [f"math.{fn}" for fn in ("ceil", "floor", "trunc", "sqrt")]
    + [f"torch.sym_{fn}" for fn in ("int", "float", "max", "min", "not", "sqrt", "ite", "sum")]
)
_DENIED_ATEN = ("torch.ops.aten.from_file.",)  # reads an arbitrary file into a tensor
_SYMPY_CALLS = frozenset(
    [
        "Symbol",
        "Integer",
        "Float",
        "Rational",
        "Add",
        "Mul",
        "Pow",
        "Max",
        "Min",
        "Abs",
        "Mod",
        "PythonMod",
        "FloorDiv",
        "CleanDiv",
        "CeilDiv",
        "IntTrueDiv",
        "FloatTrueDiv",
        "TruncToInt",
        "FloorToInt",
        "CeilToInt",
        "RoundToInt",
        "ToFloat",
        "PowByNatural",
        "FloatPow",
        "ModularIndexing",
        "Identity",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "StrictLessThan",
        "LessThan",
        "StrictGreaterThan",
        "GreaterThan",
        "Equality",
        "Unequality",
        "And",
        "Or",
        "Not",
        "true",
        "false",
        "oo",
        "zoo",
        "nan",
        "Piecewise",
        "floor",
        "ceiling",
    ]
)
_SYMBOL = re.compile(r"[a-z][0-9]+")
_BREAKS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")
_DENIED_KEYS = ("as_graph", "as_custom_obj", "as_operator")


def load_torch_program(data: bytes, where: str) -> Any:
    """The ``torch.export`` program in ``data`` (the bytes of ``where``), checked first.

    Returns:
        ``torch.export.ExportedProgram``.

    Raises:
        UnsafeArchiveError: the archive could run code when loaded (see the module docstring).
        InputError: not a torch.export archive, or torch cannot deserialise it.
    """
    import torch

    check_torch_program(data, where)
    with warnings.catch_warnings():
        # torch's own pytree deprecation inside its loader, once per load: not the user's concern
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")
        try:
            return torch.export.load(io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
            raise InputError(
                f"{where}: torch cannot load this program ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None


def check_torch_program(data: bytes, where: str) -> None:
    """Refuse a ``torch.export`` archive that could run code when loaded.

    Args:
        data: the archive's bytes.
        where: the file name used in error messages.

    Raises:
        UnsafeArchiveError: naming the member and the problem.
        InputError: not a readable torch.export archive.
    """
    records = _records(data, where)
    _check_members(set(records), records.get, where)
    _check_sample_inputs(records.get("data/sample_inputs/model.pt"), where)


def screen_torch_archive(path: str | os.PathLike, where: str) -> None:
    """The checks of :func:`check_torch_program` that need no torch, on the file: member names,
    pickled payloads, the program JSON, and sample inputs screened by their pickle opcodes.

    ``load_package`` runs this whatever the runtime (a package carrying an unsafe program is
    refused) without importing torch or reading the weights; :func:`load_torch_program` still
    runs the full check, with torch's own zip reader and restricted unpickler, on the bytes it
    loads.

    Raises:
        UnsafeArchiveError: naming the member and the problem.
        InputError: not a torch.export archive.
    """
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
            names, read = _zip_view(archive, where)
            _check_members(names, read, where)
            _screen_sample_inputs(read("data/sample_inputs/model.pt"), where)
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{where}: not a torch.export archive ({type(exc).__name__}: {exc})") from None


_MAX_SCREENED_MEMBER = 1 << 30
"""Largest member :func:`screen_torch_archive` decompresses (the JSON files and sample inputs)."""


def _zip_view(archive: zipfile.ZipFile, where: str) -> tuple[set[str], Callable[[str], bytes | None]]:
    """Member names without the archive's top folder (as torch's reader names them) and a reader."""
    full = {info.filename.split("/", 1)[-1]: info for info in archive.infolist()}
    if len(full) != len(archive.infolist()):
        raise UnsafeArchiveError(f"{where}: the zip directory is inconsistent (duplicate or hidden members)")
    bad = sorted(n for n in full if not _MEMBERS.fullmatch(n))
    if bad:
        raise UnsafeArchiveError(_member_refused(where, bad[0]))

    def read(name: str) -> bytes | None:
        info = full.get(name)
        if info is None:
            return None
        if info.file_size > _MAX_SCREENED_MEMBER:
            raise InputError(f"{where}: member {name} declares {info.file_size} bytes; refused")
        return archive.read(info)

    if read("archive_format") != b"pt2":
        raise InputError(f"{where}: not a torch.export archive (archive_format is not 'pt2')")
    return set(full), read


def _check_members(names: Collection[str], read: Callable[[str], bytes | None], where: str) -> None:
    weights = _json(read, "data/weights/model_weights_config.json", where)
    _check_payloads(weights, "weight_", "data/weights/", names, where)
    constants = _json(read, "data/constants/model_constants_config.json", where)
    _check_payloads(constants, "tensor_", "data/constants/", names, where)
    _check_program(_json(read, "models/model.json", where), f"{where}: models/model.json")


def _member_refused(where: str, name: str) -> str:
    return (
        f"{where}: member {name!r} is not one torch.export.save writes (native "
        "code, pickles and other extras are refused); re-export the model with "
        "atso_fast.export_model or remove model.pt2 to use ONNX Runtime"
    )


def _records(data: bytes, where: str) -> dict[str, bytes]:
    """Members as torch's zip reader sees them, after checking their names (both zip views)."""
    import torch

    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        names = list(reader.get_all_records())
        py_names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except Exception as exc:  # noqa: BLE001 - RuntimeError from torch, BadZipFile, ...
        raise InputError(f"{where}: not a torch.export archive ({type(exc).__name__}: {exc})") from None
    bad = sorted(n for n in names if not _MEMBERS.fullmatch(n))
    if bad:
        raise UnsafeArchiveError(_member_refused(where, bad[0]))
    if sorted(n.split("/", 1)[-1] for n in py_names) != sorted(names) or len(set(names)) != len(names):
        raise UnsafeArchiveError(f"{where}: the zip directory is inconsistent (duplicate or hidden members)")
    if "archive_format" not in names or bytes(reader.get_record("archive_format")) != b"pt2":
        raise InputError(f"{where}: not a torch.export archive (archive_format is not 'pt2')")
    return {n: bytes(reader.get_record(n)) for n in names}


def _json(read: Callable[[str], bytes | None], name: str, where: str) -> Any:
    data = read(name)
    if data is None:
        raise InputError(f"{where}: {name} missing (not an archive written by torch.export.save)")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{where}: {name} is not valid JSON ({exc})") from None


def _check_payloads(config: Any, prefix: str, folder: str, names: Collection[str], where: str) -> None:
    """Every weight/constant is raw tensor bytes in a member of this archive, never a pickle."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise InputError(f"{where}: {folder} config is not a mapping")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise InputError(f"{where}: {folder} entry {fqn!r} is not a mapping")
        path = meta.get("path_name")
        if meta.get("use_pickle") is not False:
            raise UnsafeArchiveError(
                f"{where}: {folder}{path} ({fqn}) is stored as a pickle; loading it would "
                "run arbitrary code, so this archive is refused"
            )
        if (
            not isinstance(path, str)
            or not re.fullmatch(re.escape(prefix) + r"\d+", path)
            or folder + path not in names
        ):
            raise UnsafeArchiveError(f"{where}: {folder} entry {fqn!r} names {path!r}, not a raw tensor member")


def _check_sample_inputs(data: bytes | None, where: str) -> None:
    """torch loads sample inputs with ``weights_only=True`` and retries a failure without it:
    only a file the restricted unpickler accepts (tensors, tuples, dicts) may reach it."""
    import torch

    if not data:
        return
    try:
        value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError and friends
        raise UnsafeArchiveError(
            f"{where}: data/sample_inputs/model.pt holds objects beyond tensors "
            f"(needs a full unpickle: {type(exc).__name__}); refused"
        ) from None
    if not isinstance(value, (tuple, dict)):
        raise UnsafeArchiveError(
            f"{where}: data/sample_inputs/model.pt is a {type(value).__name__}, not a tuple or dict; refused"
        )


_SAMPLE_GLOBALS = frozenset(
    [
        "torch._utils _rebuild_tensor_v2",
        "torch._utils _rebuild_parameter",
        "collections OrderedDict",
        "torch Size",
        "torch device",
    ]
)
_STORAGE = re.compile(r"torch [A-Z][A-Za-z0-9]*Storage")


def _screen_sample_inputs(data: bytes | None, where: str) -> None:
    """Without torch: the sample inputs' pickle may name only tensor-rebuilding globals (a
    stricter list than torch's restricted unpickler, which still runs at load)."""
    if not data:
        return
    refused = f"{where}: data/sample_inputs/model.pt holds objects beyond tensors"
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            pickles = [n for n in inner.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pickles) != 1:
                raise UnsafeArchiveError(f"{refused} (not one data.pkl: {len(pickles)}); refused")
            strings: list[str] = []
            for op, arg, _ in pickletools.genops(inner.read(pickles[0])):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings = [*strings[-1:], str(arg)]
                named = {"GLOBAL": arg, "STACK_GLOBAL": " ".join(strings[-2:])}.get(op.name)
                if op.name in ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX") or (
                    named is not None and named not in _SAMPLE_GLOBALS and not _STORAGE.fullmatch(named)
                ):
                    raise UnsafeArchiveError(f"{refused} ({op.name} {named or ''}); refused")
    except UnsafeArchiveError:  # a ValueError too: keep the reason above
        raise
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
        raise UnsafeArchiveError(f"{refused} (unreadable: {type(exc).__name__}); refused") from None


def _check_program(program: Any, where: str) -> None:
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise InputError(f"{where}: not a serialised ExportedProgram")
    if program.get("guards_code"):
        raise UnsafeArchiveError(f"{where}: guards_code is Python source that torch executes; refused")
    for key in program.get("range_constraints") or {}:
        _check_expression(key, where)
    for key, value in _walk(program):
        _check_field(key, value, where)
    graph = program["graph_module"].get("graph") or {}
    if graph.get("custom_obj_values"):
        raise UnsafeArchiveError(f"{where}: custom objects (custom_obj_values) are refused")
    for arg in graph.get("inputs") or []:
        if not (isinstance(arg, dict) and set(arg) == {"as_tensor"}):
            raise UnsafeArchiveError(f"{where}: graph input {arg!r} is not a tensor; refused")
    _check_signature(program["graph_module"].get("signature") or {}, where)


def _walk(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of every dict entry, depth first; list items keep their parent's key."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k), v
            yield from _walk(v, str(k))
    elif isinstance(node, list):
        for v in node:
            if not isinstance(v, (dict, list)):
                yield key, v
            yield from _walk(v, key)


def _check_field(key: str, value: Any, where: str) -> None:
    if key in _DENIED_KEYS:
        raise UnsafeArchiveError(f"{where}: {key} (a sub-graph, operator or custom object argument) is refused")
    if isinstance(value, str):
        if _BREAKS.search(value):
            raise UnsafeArchiveError(f"{where}: {key} holds a control character ({value[:60]!r}); refused")
        if key == "expr_str":
            _check_expression(value, where)
        elif key == "target":
            _check_target(value, where)
        elif key in ("name", "as_name", "forward_arg_names") and not _IDENT.fullmatch(value):
            raise UnsafeArchiveError(f"{where}: {key} {value[:60]!r} is not an identifier; refused")
        elif (
            key in ("parameter_name", "buffer_name", "tensor_constant_name", "fqn")
            and value
            and not _DOTTED.fullmatch(value)
        ):
            raise UnsafeArchiveError(f"{where}: {key} {value[:60]!r} is not a dotted name; refused")
    elif key in ("min_val", "max_val", "hint", "as_int") and value is not None and not isinstance(value, (int, dict)):
        raise UnsafeArchiveError(f"{where}: {key} must be an integer, got {value!r}")


def _check_target(target: str, where: str) -> None:
    if target in _HELPERS or (_ATEN.fullmatch(target) and not target.startswith(_DENIED_ATEN)):
        return
    raise UnsafeArchiveError(
        f"{where}: graph call target {target!r} is not an ATen operator; refused "
        "(only torch.ops.aten.* and shape arithmetic are allowed)"
    )


def _check_expression(text: str, where: str) -> None:
    """A symbolic shape expression must be sympy constructor calls on literals and symbols
    (``Symbol('s77', positive=True, integer=True)``, ``2*s0 + 1``): nothing else is ``eval``-ed."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        raise UnsafeArchiveError(f"{where}: symbolic expression {text[:60]!r} does not parse; refused") from None
    for node in ast.walk(tree):
        if isinstance(
            node,
            (
                ast.Expression,
                ast.Load,
                ast.operator,
                ast.unaryop,
                ast.cmpop,
                ast.BinOp,
                ast.UnaryOp,
                ast.Compare,
                ast.keyword,
            ),
        ):
            ok = not isinstance(node, ast.keyword) or (node.arg or "").isalpha()
        elif isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS
        elif isinstance(node, ast.Name):
            ok = node.id in _SYMPY_CALLS or bool(_SYMBOL.fullmatch(node.id))
        elif isinstance(node, ast.Constant):
            ok = isinstance(node.value, (int, float, bool)) or (
                isinstance(node.value, str) and bool(_SYMBOL.fullmatch(node.value))
            )
        else:
            ok = False
        if not ok:
            raise UnsafeArchiveError(
                f"{where}: symbolic expression {text[:60]!r} is more than sympy "
                f"constructors on symbols and numbers ({type(node).__name__}); refused"
            )


_INPUT_KINDS = frozenset(["user_input", "parameter", "buffer", "tensor_constant"])
_OUTPUT_KINDS = frozenset(["user_output", "buffer_mutation"])


def _check_signature(signature: dict[str, Any], where: str) -> None:
    for field, allowed in (("input_specs", _INPUT_KINDS), ("output_specs", _OUTPUT_KINDS)):
        for spec in signature.get(field) or []:
            kinds = set(spec) if isinstance(spec, dict) else {"?"}
            if not kinds <= allowed:
                raise UnsafeArchiveError(
                    f"{where}: signature {field} kind {sorted(kinds)} is refused "
                    f"(allowed: {', '.join(sorted(allowed))})"
                )
