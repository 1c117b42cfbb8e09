"""Which runtime runs a package: measured agreement, not a rule (issue 25).

When a package is exported or imported (or ``atso-fast measure PKG`` runs on a new machine), its
network runs on sample windows under every runtime installed here and is compared with a
reference (the package's torch program in float32 when it has one, else ONNX Runtime float32):
per runtime and precision the largest logit error, the share of window voxels whose label
(argmax) agrees with the reference's, and windows per second. The record goes into
``model.json`` under ``runtime_agreement``, keyed by the ONNX file's sha256, so it never applies
to another network.

``runtime="auto"`` then runs the fastest runtime whose recorded label agreement meets the
tolerance (default 99.9% of voxels, ``model.json`` ``runtime_agreement.tolerance``): by measured
speed when the record was taken on this machine, else in the rule's order (speed does not carry
across machines; agreement does). A package without a valid record, or with one for another
network or device, falls back to the rule of :func:`atso_fast.runtimes.auto_candidates`. The
choice and its reason are said once per run (:attr:`Relabeler.runtime_reason`).

Sample windows: real windows of a scan when one is given (the engine's own preprocessing and
window grid, evenly spread over the volume), else seeded standard-normal input (normalised
space), which says less about label agreement on anatomy.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from atso_fast.engine.preprocess import prepare
from atso_fast.engine.windows import grid_origins
from atso_fast.io.atomic import atomic_write_bytes
from atso_fast.kernels import native
from atso_fast.package.model import ModelPackage, load_package
from atso_fast.package.trust import read_meta
from atso_fast.runtimes import auto_candidates, available_runtimes, create_runtime
from atso_fast.runtimes.base import RuntimeUnavailable

__all__ = [
    "RECORD_KEY",
    "DEFAULT_TOLERANCE",
    "sample_windows",
    "measure_runtimes",
    "measure_package",
    "machine_id",
    "runtime_revision",
    "choose_runtime",
    "agreement_table",
]

RECORD_KEY = "runtime_agreement"
DEFAULT_TOLERANCE = 0.999
_VERSION = 1


_SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
"""CPU features that change which runtime and precision is fastest: cloud machines report one
model name ("Intel(R) Xeon(R) Processor") for CPUs with and without AVX-512 and AMX."""


def machine_id() -> str:
    """CPU model, core count and :data:`_SPEED_FLAGS` present (what decides which runtime is
    fastest here)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            lines = fh.read().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), model)
        flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    features = "+".join(f for f in _SPEED_FLAGS if f in flags)
    return f"{model}, {cores} cores" + (f", {features}" if features else "")


def runtime_revision(name: str) -> str | None:
    """The form of the graph runtime ``name`` runs, where it rewrites the network (OpenVINO's
    InstanceNormalization rewrite): a recorded agreement of another form is not this runtime's."""
    if name == "openvino":
        from atso_fast.runtimes.onnx_norm import REWRITE

        return f"norms-{REWRITE}"
    return None


MEASURE_VOXELS = 4_000_000
"""Voxels the default measurement runs through each runtime (:func:`default_count`)."""


def default_count(package: ModelPackage) -> int:
    """Windows to measure by default: at least :data:`MEASURE_VOXELS` voxels, 2 to 8 windows.
    Eight windows of nnU-Net's planner patch for an abdominal CT (64 x 160 x 192, two folds) kept
    an import measuring for over 10 minutes on 2 cores; 3 of them hold 5.9 million voxels, plenty
    to resolve a label agreement of 99.9%."""
    return int(min(8, max(2, math.ceil(MEASURE_VOXELS / math.prod(package.window)))))


def sample_windows(
    package: ModelPackage,
    volume: np.ndarray | None = None,
    *,
    spacing: Any = None,
    affine: Any = None,
    count: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, str]:
    """``(windows (N, M, *window) float32 normalised, source)`` to measure runtimes on.

    Args:
        package: the package.
        volume: a scan ``(Z, Y, X)`` or ``(M, Z, Y, X)`` in its stored intensities, or None for
            seeded standard-normal windows.
        spacing, affine: the scan's geometry (as ``Relabeler.relabel_volume`` takes them).
        count: windows (evenly spread over the scan's window grid); None: :func:`default_count`.
        seed: seed of the random windows.
    """
    count = default_count(package) if count is None else count
    if int(count) < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    win, m = package.window3d, package.in_channels
    if volume is None:
        x = np.random.default_rng(seed).standard_normal((int(count), m, *package.window), dtype=np.float32)
        return x, "random normalised input"
    arr = np.asarray(volume, np.float32)
    arr = arr.reshape((1,) * (4 - arr.ndim) + arr.shape) if arr.ndim < 4 else arr
    vol, _ = prepare(np.ascontiguousarray(arr), package, spacing=spacing, affine=affine)
    origins = grid_origins(package.preprocessing["grid"], vol.shape[1:], win, 0.5)
    pick = origins[np.unique(np.linspace(0, len(origins) - 1, int(count)).round().astype(np.int64))]
    patches = native.extract_patches(vol, pick, win)
    return np.ascontiguousarray(patches.reshape(len(pick), m, *package.window)), f"{len(pick)} windows of a scan"


def _run(runtime: Any, windows: np.ndarray, batch_size: int) -> np.ndarray:
    outs = []
    for lo in range(0, len(windows), batch_size):
        outs.append(np.array(runtime(np.ascontiguousarray(windows[lo : lo + batch_size])), np.float32))
    return np.concatenate(outs)


def onnx_digest(package: ModelPackage) -> str:
    """sha256 of the verified ONNX bytes (hashed once, by ``load_package``)."""
    return package.onnx_sha256().hexdigest()


def _reference(package: ModelPackage) -> str:
    return "torch" if package.torch_file and package.torch_screened else "onnxruntime"


def measure_runtimes(
    package: ModelPackage,
    windows: np.ndarray,
    *,
    device: str = "cpu",
    precisions: Sequence[str] = ("float32",),
    runtimes: Sequence[str] | None = None,
    batch_size: int = 4,
    repeats: int = 2,
    source: str = "",
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """Run ``windows`` under each runtime and precision against the float32 reference.

    Returns:
        the record (see the module docstring): ``{"version", "onnx_sha256", "device", "machine",
        "measured", "reference", "windows", "input", "tolerance", "results": {"name/precision":
        {"status": "ok", "max_abs_logit_error", "label_agreement", "windows_per_s"} or
        {"status": "unavailable" | "failed", "reason"}}}``.

    Raises:
        ValueError: no ONNX network in the package, or the reference cannot run.
    """
    if "onnx" not in package.verified:
        raise ValueError("measure_runtimes needs a loaded package with an ONNX network (load_package)")
    ref_name = _reference(package)
    ref_rt = create_runtime(ref_name, device=device, package=package, precision="float32", batch_size=batch_size)
    reference = _run(ref_rt, windows, batch_size)
    ref_labels = reference.argmax(1)
    results: dict[str, Any] = {}
    for name in runtimes or available_runtimes(device):
        for precision in precisions:
            results[f"{name}/{precision}"] = _measure_one(
                package, name, precision, device, windows, batch_size, repeats, reference, ref_labels
            )
    return {
        "version": _VERSION,
        "onnx_sha256": onnx_digest(package),
        "device": device,
        "machine": machine_id(),
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "reference": f"{ref_name}/float32",
        "windows": int(len(windows)),
        "input": source,
        "tolerance": float(tolerance),
        "results": results,
    }


def _measure_one(
    package: ModelPackage,
    name: str,
    precision: str,
    device: str,
    windows: np.ndarray,
    batch_size: int,
    repeats: int,
    reference: np.ndarray,
    ref_labels: np.ndarray,
) -> dict[str, Any]:
    try:
        # torch: contiguous first, channels-last after (_torch_layout), never the in-run probe
        layout = {"channels_last": False} if name == "torch" else {}
        rt = create_runtime(name, device=device, package=package, precision=precision, batch_size=batch_size, **layout)
    except (RuntimeUnavailable, ImportError, ValueError) as exc:
        return {"status": "unavailable", "reason": " ".join(str(exc).split())[:300] or type(exc).__name__}
    try:
        out = _run(rt, windows, batch_size)  # warm-up, and the values compared
        best = math.inf
        for _ in range(max(1, int(repeats))):
            start = time.perf_counter()
            _run(rt, windows, batch_size)
            best = min(best, time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - a runtime that cannot run this network is a result
        return {"status": "failed", "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    if out.shape != reference.shape or not np.isfinite(out).all():
        return {"status": "failed", "reason": f"output shape {out.shape} or non-finite values"}
    result = {
        "status": "ok",
        "max_abs_logit_error": float(np.abs(out - reference).max()),
        "label_agreement": float((out.argmax(1) == ref_labels).mean()),
        "windows_per_s": float(len(windows) / best) if best > 0 else None,
    }
    if (revision := runtime_revision(name)) is not None:
        result["revision"] = revision
    if name == "torch" and device == "cpu" and windows.ndim == 5:
        result.update(_torch_layout(rt, windows, batch_size, repeats, best))
    return result


def _torch_layout(rt: Any, windows: np.ndarray, batch_size: int, repeats: int, contiguous_s: float) -> dict:
    """The same windows in channels-last (the run above was contiguous: the probe never starts
    on a short batch): the faster layout and its speed, for the torch runtime to use from then
    on instead of probing in every process (on nnU-Net's 3D U-Nets channels-last ran ~40%
    slower here, on MONAI's UNet faster)."""
    rt.channels_last = True
    _run(rt, windows, batch_size)  # converts the weights once; untimed
    best = math.inf
    for _ in range(max(1, int(repeats))):
        start = time.perf_counter()
        _run(rt, windows, batch_size)
        best = min(best, time.perf_counter() - start)
    faster = "channels_last" if best < contiguous_s else "contiguous"
    return {"layout": faster, "windows_per_s": float(len(windows) / min(best, contiguous_s))}


def recorded_torch_layout(package: ModelPackage, device: str, precision: str) -> bool | None:
    """``channels_last`` for the torch runtime from the package's record when it was measured on
    this machine and device (:func:`_torch_layout`), else None (the runtime probes)."""
    record = package.extra.get(RECORD_KEY)
    if device != "cpu" or not _valid_record(record, package, device) or record.get("machine") != machine_id():
        return None
    layout = record["results"].get(f"torch/{precision}", {}).get("layout")
    return {"channels_last": True, "contiguous": False}.get(layout)


def measure_package(
    package_dir: str | os.PathLike[str],
    volume: np.ndarray | None = None,
    *,
    spacing: Any = None,
    affine: Any = None,
    count: int | None = None,
    device: str = "cpu",
    precisions: Sequence[str] = ("float32",),
    tolerance: float = DEFAULT_TOLERANCE,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Measure a package on this machine (:func:`sample_windows`, :func:`measure_runtimes`) and
    record the result in its ``model.json`` (atomically; the other fields untouched).

    Returns:
        the record.
    """
    if not 0.0 < float(tolerance) <= 1.0:
        raise ValueError(f"tolerance must be in (0, 1], got {tolerance}")
    root = Path(package_dir)
    package = load_package(root)
    windows, source = sample_windows(package, volume, spacing=spacing, affine=affine, count=count)
    record = measure_runtimes(
        package,
        windows,
        device=device,
        precisions=precisions,
        source=source,
        tolerance=tolerance,
        batch_size=batch_size,
    )
    meta_path, meta = read_meta(root)
    meta[RECORD_KEY] = record
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    return record


def _valid_record(record: Any, package: ModelPackage, device: str) -> TypeGuard[dict[str, Any]]:
    """A record of this network (sha256 of the verified ONNX bytes) and this device, well formed."""
    if not isinstance(record, dict) or record.get("version") != _VERSION or record.get("device") != device:
        return False
    results = record.get("results")
    if not isinstance(results, dict) or "onnx" not in package.verified:
        return False
    if record.get("onnx_sha256") != onnx_digest(package):
        return False
    return all(isinstance(v, dict) and isinstance(v.get("status"), str) for v in results.values())


def choose_runtime(
    package: ModelPackage,
    *,
    device: str,
    precision: str,
    has_module: bool,
    has_program: bool,
    tolerance: float | None = None,
) -> tuple[list[str], str]:
    """``(candidates best first, reason)`` for ``runtime="auto"``: from the package's recorded
    agreement when it has a valid one (see the module docstring), else the rule."""
    rule = auto_candidates(
        device,
        has_onnx=package.root is not None,
        has_module=has_module,
        has_program=has_program,
        precision=precision,
    )
    record = package.extra.get(RECORD_KEY)
    if has_module or not _valid_record(record, package, device):
        why = "no runtime agreement recorded for this network and device" if not has_module else "a live module"
        return rule, f"the rule ({why}): {rule[0]}"
    tol = float(record.get("tolerance", DEFAULT_TOLERANCE)) if tolerance is None else float(tolerance)
    measured = {k.split("/")[0]: v for k, v in record["results"].items() if k.endswith(f"/{precision}")}
    stale = sorted(k for k, v in measured.items() if v.get("revision") != runtime_revision(k))
    ok = {
        k: v
        for k, v in measured.items()
        if k not in stale
        and v.get("status") == "ok"
        and isinstance(v.get("label_agreement"), (int, float))
        and v["label_agreement"] >= tol
    }
    installed = set(available_runtimes(device)) | set(rule)
    ok = {k: v for k, v in ok.items() if k in installed and (k != "torch" or has_program)}
    note = (
        f"; not counted: {', '.join(stale)}, measured with an older form of its graph ('atso-fast measure' re-measures)"
        if stale
        else ""
    )
    if not ok:
        return rule, (
            f"the rule: no runtime met {tol:.2%} label agreement in the record "
            f"({record.get('measured', '?')}{note}); {rule[0]}"
        )
    same_machine = record.get("machine") == machine_id()
    if same_machine:
        order = sorted(ok, key=lambda k: -(ok[k].get("windows_per_s") or 0.0))
    else:
        order = [k for k in rule if k in ok] + sorted(k for k in ok if k not in rule)
    best = ok[order[0]]
    speed = f", {best['windows_per_s']:.3g} windows/s" if same_machine and best.get("windows_per_s") else ""
    reason = (
        f"{order[0]}: {'fastest' if same_machine else 'first in the rule order'} of the runtimes meeting "
        f"{tol:.2%} label agreement ({best['label_agreement']:.4%}{speed}; measured "
        f"{record.get('measured', '?')} on {record.get('input') or 'sample windows'}"
        f"{'' if same_machine else ', another machine: speed not compared'}{note})"
    )
    return order + [k for k in rule if k not in order], reason


def agreement_table(record: dict[str, Any]) -> str:
    """The record as lines for ``atso-fast relabel -v`` and ``atso-fast measure``."""
    lines = [
        f"runtime agreement ({record.get('measured', '?')}, {record.get('machine', '?')}; reference "
        f"{record.get('reference')}; {record.get('windows')} windows: {record.get('input') or '-'}; "
        f"tolerance {record.get('tolerance', DEFAULT_TOLERANCE):.2%})",
        f"{'runtime/precision':<22} {'labels agree':>12} {'max |logit err|':>16} {'windows/s':>10}",
    ]
    for key, v in record.get("results", {}).items():
        if v.get("status") != "ok":
            lines.append(f"{key:<22} {v.get('status')}: {v.get('reason', '')[:80]}")
            continue
        wps = v.get("windows_per_s")
        lines.append(
            f"{key:<22} {v['label_agreement']:>12.4%} {v['max_abs_logit_error']:>16.3g} "
            f"{'-' if wps is None else f'{wps:.3g}':>10}"
        )
    return "\n".join(lines)
