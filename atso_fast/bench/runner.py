"""``atso-fast bench``: throughput of every runtime and precision on one synthetic CT volume.

For each runtime/precision pair the benchmark

1. builds a :class:`~atso_fast.engine.Relabeler` (an unavailable pair is listed as skipped,
   with the reason),
2. runs it once as a warm-up and compares its labels to the float32 reference (torch, else
   ONNX Runtime); a pair below the agreement target is reported as incorrect and not timed,
3. times ``relabel_volume`` ``repeats`` times (median) while sampling peak host memory (and
   ``torch.cuda.max_memory_allocated`` on CUDA),
4. times the runtime alone on the very same window batches (extracted once, in the engine's
   order and batch split: near-equal batches for a runtime with a dynamic batch), so
   ``overhead = (volume time - network time) / network time`` is what normalisation, window
   extraction, blending and thresholding cost on top of the network;
   for a pipelined runtime (OpenVINO: two batches in flight, stitching overlapped with the
   network) the same relabeler is also timed with one batch in flight (``seq overhead``), so
   the table shows what the overlap saves.

Without ``MODEL_DIR`` a built-in network is exported to a temporary package: MONAI's 3D U-Net
(16-32-64-128-256, two residual units, the design sketch's anchor network) when MONAI is importable, else a
small plain conv-net. The network and memory helpers
(:mod:`atso_fast.bench.networks`, :mod:`atso_fast.bench.memory`) are shared with ``benchmarks/``;
the volume is :func:`atso_fast.datasets.synthetic.synthetic_ct`.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from atso_fast.bench.memory import _MIB, PeakMemory
from atso_fast.bench.networks import export_builtin
from atso_fast.datasets.synthetic import synthetic_ct
from atso_fast.engine.relabeler import Relabeler
from atso_fast.engine.windows import batch_bounds, sliding_window_origins
from atso_fast.kernels import native
from atso_fast.package import load_package
from atso_fast.package.normalize import normalize
from atso_fast.progress import Progress
from atso_fast.runtimes import RuntimeUnavailable

if TYPE_CHECKING:
    import torch

__all__ = [
    "BENCH_RUNTIMES",
    "MIN_AGREEMENT",
    "BenchConfig",
    "Device",
    "machine_info",
    "run_bench",
    "run_batches",
    "time_repeats",
    "window_batches",
]

BENCH_RUNTIMES = ("openvino", "onnxruntime", "torch", "tensorrt")
"""Runtimes ``--runtimes all`` tries, in table order."""
MIN_AGREEMENT = {"float32": 0.9999, "float16": 0.999, "bfloat16": 0.995}
"""Label agreement with the float32 reference below which a pair counts as incorrect
(the design targets: 99.99% float32, 99.9% fp16; bfloat16, 8 mantissa bits: 99.5%)."""
_PRECISIONS = ("float32", "float16", "bfloat16")


def window_batches(
    package: Any, volume: np.ndarray, overlap: Any, batch_size: int, device: str, *, even: bool = False
) -> list[Any]:
    """The engine's window batches for ``volume``, extracted once (normalised, on ``device``).

    Same grid and split as ``Relabeler._stream``: MONAI's full batches by default, near-equal
    ones with ``even=True`` (what a runtime with a dynamic batch, OpenVINO, runs; see
    ``batch_bounds``); each batch is shaped like the runtime's input ``(B, M, *window)``.
    """

    vol: np.ndarray | torch.Tensor = np.ascontiguousarray(
        normalize(volume.reshape((-1, *volume.shape[-3:])), package.normalization), dtype=np.float32
    )
    if device.startswith("cuda"):
        import torch

        vol = torch.from_numpy(vol).to(device)
    win = package.window3d
    origins = sliding_window_origins(vol.shape[1:], win, overlap)
    batches = []
    for lo, hi in batch_bounds(len(origins), batch_size, even=even):
        patches = native.extract_patches(vol, origins[lo:hi], win)
        batches.append(patches.reshape(patches.shape[0], package.in_channels, *package.window))
    return batches


# --------------------------------------------------------------------------- configuration
@dataclass
class BenchConfig:
    """Validated options of one benchmark run (see :func:`build_parser`)."""

    model_dir: Path | None
    shape: tuple[int, int, int]
    window: tuple[int, int, int]
    runtimes: tuple[str, ...]
    precisions: tuple[str, ...]
    batch: int = 4
    overlap: float = 0.5
    classes: int = 3
    device: str = "cpu"
    repeats: int = 3
    net: str = "auto"
    seed: int = 0
    compile: bool = False


# --------------------------------------------------------------------------- one pair
class Device:
    """Synchronisation and peak device memory (torch allocator) on CUDA; no-ops on CPU."""

    def __init__(self, device: str):
        self.device = device
        self.torch = None
        if device.startswith("cuda"):
            import torch

            self.torch = torch

    def sync(self) -> None:
        if self.torch is not None:
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.torch is not None:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float | None:
        if self.torch is None:
            return None
        self.sync()
        return self.torch.cuda.max_memory_allocated(self.device) / _MIB


def _make_relabeler(
    cfg: BenchConfig, model_dir: Path, runtime: str, precision: str, compile: bool = False
) -> tuple[Any, str | None]:
    """A relabeler, or ``(None, reason)`` when the pair cannot run here."""

    try:
        return Relabeler(
            model_dir,
            runtime=runtime,
            device=cfg.device,
            overlap=cfg.overlap,
            batch_size=cfg.batch,
            precision=precision,
            compile=compile,
        ), None
    except (RuntimeUnavailable, ImportError, ValueError) as exc:
        return None, " ".join(str(exc).split()) or type(exc).__name__


def time_repeats(fn: Any, repeats: int, dev: Device) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn``, the device synchronised around each."""
    times = []
    for _ in range(repeats):
        dev.sync()
        start = time.perf_counter()
        fn()
        dev.sync()
        times.append(time.perf_counter() - start)
    return times


def run_batches(runtime: Any, batches: list[Any]) -> None:
    """Every batch through ``runtime`` with up to ``runtime.in_flight`` pending, as the engine
    submits them (a two-stream runtime called one batch at a time would use one stream only)."""
    pending: deque[Any] = deque()
    for batch in batches:
        if len(pending) >= runtime.in_flight:
            pending.popleft().result()
        pending.append(runtime.submit(batch))
    while pending:
        pending.popleft().result()


def _time_pair(rel: Any, cfg: BenchConfig, volume: np.ndarray, batches: list[Any]) -> dict[str, Any]:
    """Volume runs and network-alone runs on ``batches``, interleaved so that load from other
    processes hits both alike (and, for a pipelined runtime, volume runs one batch at a time);
    peak memory over the whole loop."""
    dev = Device(cfg.device)
    dev.reset_peak()
    depth = int(getattr(rel.runtime, "in_flight", 1))
    vol_times: list[float] = []
    net_times: list[float] = []
    seq_times: list[float] = []
    stages: list[dict[str, float]] = []  # the engine's own split of each volume's seconds
    with PeakMemory() as mem:
        for _ in range(cfg.repeats):
            vol_times += time_repeats(
                lambda: stages.append(rel.relabel_volume(volume).stats.get("timings") or {}), 1, dev
            )
            net_times += time_repeats(lambda: run_batches(rel.runtime, batches), 1, dev)
            if depth > 1 and getattr(rel.runtime, "streams", 1) == 1:  # two streams, one batch: half the threads
                seq_times += _sequential(rel, volume, dev)
    seconds, network = statistics.median(vol_times), statistics.median(net_times)
    stage_seconds = {k: statistics.median(st[k] for st in stages) for k in stages[0]} if stages and stages[0] else None
    windows = sum(int(b.shape[0]) for b in batches)
    seq = statistics.median(seq_times) if seq_times else None
    return {
        "seconds": seconds,
        "seconds_all": vol_times,
        "voxels_per_s": float(np.prod(cfg.shape)) / seconds,
        "windows_per_s": windows / seconds,
        "network_seconds": network,
        "network_seconds_all": net_times,
        "overhead": (seconds - network) / network,
        "overhead_min": min(vol_times) / min(net_times) - 1.0,
        "in_flight": depth,
        "sequential_seconds": seq,
        "sequential_seconds_all": seq_times or None,
        "sequential_overhead": None if seq is None else (seq - network) / network,
        "peak_host_mib": mem.peak_mib,
        "host_delta_mib": mem.delta_mib,
        "device_peak_mib": dev.peak_mib(),
        "stage_seconds": stage_seconds,
    }


def _sequential(rel: Any, volume: np.ndarray, dev: Device) -> list[float]:
    """One volume with one batch in flight (no overlap of network and stitching)."""
    depth = rel.runtime.in_flight
    rel.runtime.in_flight = 1
    try:
        return time_repeats(lambda: rel.relabel_volume(volume), 1, dev)
    finally:
        rel.runtime.in_flight = depth


def _row(runtime: str, precision: str, status: str, **fields: Any) -> dict[str, Any]:
    return {
        "runtime": runtime,
        "precision": precision,
        "status": status,
        "reason": None,
        "correct": None,
        "agreement": None,
        **fields,
    }


def _bench_pair(
    cfg: BenchConfig,
    rel: Any,
    runtime: str,
    precision: str,
    volume: np.ndarray,
    reference: np.ndarray,
    batches: list[Any],
) -> dict[str, Any]:
    """Warm-up + correctness, then (only if correct) the timings."""
    try:
        labels = rel.relabel_volume(volume).labels
        agreement = float(np.mean(labels == reference))
        if agreement < MIN_AGREEMENT[precision]:
            return _row(
                runtime,
                precision,
                "incorrect",
                correct=False,
                agreement=agreement,
                reason=f"label agreement {agreement:.6f} < {MIN_AGREEMENT[precision]}",
            )
        timings = _time_pair(rel, cfg, volume, batches)
    except Exception as exc:  # noqa: BLE001 - one broken pair must not hide the others
        return _row(runtime, precision, "failed", correct=False, reason=f"{type(exc).__name__}: {exc}")
    return _row(runtime, precision, "ok", correct=True, agreement=agreement, **timings)


def _reference(cfg: BenchConfig, model_dir: Path, volume: np.ndarray, cache: dict) -> tuple[str, np.ndarray]:
    """float32 labels of the first of torch, onnxruntime that runs here (kept in ``cache``)."""
    reasons = []
    for runtime in ("torch", "onnxruntime"):
        rel, reason = _make_relabeler(cfg, model_dir, runtime, "float32")
        if rel is not None:
            cache[(runtime, "float32")] = rel
            return f"{runtime}/float32", rel.relabel_volume(volume).labels
        reasons.append(f"{runtime}: {reason}")
    raise RuntimeError("no float32 reference runtime is available: " + "; ".join(reasons))


# --------------------------------------------------------------------------- the whole run
def _model_dir(cfg: BenchConfig, scratch: Path) -> tuple[Path, str]:
    if cfg.model_dir is not None:
        return cfg.model_dir, str(cfg.model_dir)
    path, name = export_builtin(scratch / "model", window=cfg.window, classes=cfg.classes, net=cfg.net, seed=cfg.seed)
    return path, f"builtin:{name}"


def _cpu_model() -> str | None:
    """``model name`` of the first CPU in ``/proc/cpuinfo`` (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        return None


def machine_info(device: str) -> dict[str, Any]:
    """CPU model and count, torch version, the native build and (CUDA) the GPU's name: the
    machine a report's numbers come from."""
    import torch

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "native": native.build_info(),
    }
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _run_pairs(
    cfg: BenchConfig,
    model_dir: Path,
    volume: np.ndarray,
    reference: np.ndarray,
    splits: Callable[[bool], list[Any]],
    cache: dict,
) -> list[dict[str, Any]]:
    """One row per runtime/precision pair, in ``cfg`` order; one relabeler alive at a time.

    ``splits(even)`` gives the window batches; each runtime's network-alone time runs the split
    its relabel pass runs (near-equal batches for a dynamic batch), so that the overhead column
    holds stitching and waiting only."""
    rows: list[dict[str, Any]] = []
    pairs = [(r, p) for r in cfg.runtimes for p in cfg.precisions]
    progress = Progress("bench: runtime/precision pairs", len(pairs), unit="pair", every=0.0)
    for runtime, precision in pairs:
        progress.update(len(rows), f"next {runtime}/{precision}, {cfg.repeats} timed runs")
        compile = cfg.compile and runtime == "torch"
        rel, reason = cache.pop((runtime, precision), None), None
        if rel is None or compile:  # the cached reference relabeler is not compiled
            rel, reason = _make_relabeler(cfg, model_dir, runtime, precision, compile)
        rows.append(
            _row(runtime, precision, "skipped", reason=reason)
            if rel is None
            else _bench_pair(cfg, rel, runtime, precision, volume, reference, splits(rel.runtime.dynamic_batch))
        )
        del rel
    progress.close()
    return rows


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run every runtime/precision pair of ``cfg``; returns the report (see ``--json``).

    Raises:
        atso_fast.PackageError: ``cfg.model_dir`` is not a valid package.
        RuntimeError: no float32 reference runtime, or ``cuda`` without a CUDA build.
    """

    if cfg.device.startswith("cuda") and not native.has_cuda():
        raise RuntimeError(
            f"device {cfg.device!r} needs a CUDA GPU and a CUDA build (build_info: {native.build_info()})"
        )
    with tempfile.TemporaryDirectory(prefix="atso-bench-") as scratch:
        model_dir, source = _model_dir(cfg, Path(scratch))
        package = load_package(model_dir)
        volume = synthetic_ct(cfg.shape, cfg.seed)
        cache: dict[tuple[str, str], Any] = {}
        ref_name, reference = _reference(cfg, model_dir, volume, cache)
        wanted = {(r, p) for r in cfg.runtimes for p in cfg.precisions}
        cache = {k: v for k, v in cache.items() if k in wanted}  # drop an unrequested reference
        splits = functools.cache(
            lambda even: window_batches(package, volume, cfg.overlap, cfg.batch, cfg.device, even=even)
        )
        rows = _run_pairs(cfg, model_dir, volume, reference, splits, cache)
    ran = [r for r in rows if r["status"] != "skipped"]
    return {
        "config": {**asdict(cfg), "model_dir": str(cfg.model_dir) if cfg.model_dir else None},
        "model": {
            "source": source,
            "window": list(package.window),
            "classes": package.num_classes,
            "windows": len(sliding_window_origins(volume.shape[-3:], package.window3d, cfg.overlap)),
        },
        "reference": ref_name,
        "machine": machine_info(cfg.device),
        "results": rows,
        "correct": bool(ran) and all(r["correct"] for r in ran),
    }
