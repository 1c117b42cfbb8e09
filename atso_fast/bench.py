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
small plain conv-net. Helpers here (``builtin_network``, ``export_builtin``, ``synthetic_ct``,
``PeakMemory``) are shared with ``benchmarks/``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from atso_fast.cliargs import make_parser
from atso_fast.engine.relabeler import Relabeler
from atso_fast.engine.windows import batch_bounds, check_overlap, sliding_window_origins
from atso_fast.kernels import native
from atso_fast.package import export_model, load_package
from atso_fast.package.normalize import normalize
from atso_fast.progress import Progress
from atso_fast.runtimes import RuntimeUnavailable
from atso_fast.runtimes.base import check_device

if TYPE_CHECKING:
    from collections.abc import Callable

    from typing_extensions import Self

__all__ = [
    "peak_rss_mib",
    "BENCH_RUNTIMES",
    "CT_NORMALIZATION",
    "MIN_AGREEMENT",
    "BenchConfig",
    "Device",
    "PeakMemory",
    "build_parser",
    "builtin_network",
    "check_builtin_window",
    "cli_main",
    "config_from_args",
    "default_window",
    "export_builtin",
    "format_table",
    "maxrss_mib",
    "monai_labels",
    "reset_peak_rss",
    "run_batches",
    "run_bench",
    "synthetic_ct",
    "time_repeats",
    "window_batches",
]

BENCH_RUNTIMES = ("openvino", "onnxruntime", "torch", "tensorrt")
"""Runtimes ``--runtimes all`` tries, in table order."""
CT_NORMALIZATION = {"scheme": "ct", "clip": [-1000.0, 1000.0], "mean": 0.0, "std": 500.0}
"""Intensity policy stored with the built-in model (HU in, roughly unit scale out)."""
MIN_AGREEMENT = {"float32": 0.9999, "float16": 0.999, "bfloat16": 0.995}
"""Label agreement with the float32 reference below which a pair counts as incorrect
(the design targets: 99.99% float32, 99.9% fp16; bfloat16, 8 mantissa bits: 99.5%)."""
_PRECISIONS = ("float32", "float16", "bfloat16")
_MIB = 2.0**20

# (centre z, y, x), (radii z, y, x) in [-1, 1] volume coordinates, HU; later ones paint over.
_PHANTOM = (
    ((0.0, 0.05, 0.0), (1.3, 0.80, 0.92), -90.0),   # body outline: subcutaneous fat
    ((0.0, 0.05, 0.0), (1.3, 0.72, 0.85), 40.0),    # soft tissue
    ((0.1, -0.05, -0.42), (0.9, 0.45, 0.30), -820.0),  # lungs
    ((0.1, -0.05, 0.42), (0.9, 0.45, 0.30), -820.0),
    ((-0.45, 0.10, -0.15), (0.35, 0.30, 0.38), 60.0),  # liver
    ((-0.50, 0.30, 0.35), (0.18, 0.12, 0.10), 30.0),   # kidney
    ((0.0, 0.55, 0.0), (1.4, 0.10, 0.10), 700.0),     # spine
)


# --------------------------------------------------------------------------- shared helpers
def synthetic_ct(shape: tuple[int, int, int], seed: int = 0, noise_hu: float = 15.0) -> np.ndarray:
    """A CT-like int16 phantom ``(Z, Y, X)`` in HU: air, fat, soft tissue, lungs, organs, spine.

    Args:
        shape: ``(Z, Y, X)`` voxels, each >= 1.
        seed: seed of the gaussian noise (the anatomy itself is fixed).
        noise_hu: standard deviation of the added noise (so files do not gzip unrealistically well).

    Raises:
        ValueError: a non-positive size.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive integers (Z, Y, X), got {shape!r}")
    grids = [g.astype(np.float32) for g in np.ogrid[tuple(slice(-1.0, 1.0, complex(0, n)) for n in shape)]]
    vol = np.full(shape, -1000.0, np.float32)
    for centre, radii, hu in _PHANTOM:
        dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
        vol[dist <= 1.0] = hu
    vol += np.random.default_rng(seed).normal(0.0, noise_hu, shape).astype(np.float32)
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16)


def default_window(device: str) -> tuple[int, int, int]:
    """The built-in model's window: 64^3 on CPU, 96^3 on CUDA (the design sketch's anchor)."""
    return (96, 96, 96) if device.startswith("cuda") else (64, 64, 64)


def builtin_network(classes: int, *, net: str = "auto", seed: int = 0) -> tuple[Any, str]:
    """The benchmark network with seeded weights, in eval mode, and its name.

    Args:
        classes: output channels.
        net: ``"unet"`` (MONAI ``UNet`` 16-32-64-128-256, two residual units), ``"convnet"``
            (three plain 3D convolutions) or ``"auto"`` (the U-Net when MONAI is importable).
        seed: ``torch.manual_seed`` before construction, so every process builds equal weights.

    Raises:
        ValueError: unknown ``net`` or ``classes < 1``; ImportError for ``"unet"`` without MONAI.
    """
    import torch

    if net not in ("auto", "unet", "convnet"):
        raise ValueError(f"net must be 'auto', 'unet' or 'convnet', got {net!r}")
    if int(classes) < 1:
        raise ValueError(f"classes must be >= 1, got {classes}")
    if net == "auto":
        net = "unet" if _monai_available() else "convnet"
    torch.manual_seed(seed)
    if net == "unet":
        from monai.networks.nets import UNet

        module = UNet(spatial_dims=3, in_channels=1, out_channels=int(classes), channels=(16, 32, 64, 128, 256),
                      strides=(2, 2, 2, 2), num_res_units=2)
        return module.eval(), "monai-unet"
    conv = torch.nn.Conv3d
    module = torch.nn.Sequential(conv(1, 16, 3, padding=1), torch.nn.ReLU(), conv(16, 16, 3, padding=1),
                                 torch.nn.ReLU(), conv(16, int(classes), 1))
    return module.eval(), "convnet"


def _monai_available() -> bool:
    try:
        import monai.networks.nets  # noqa: F401
    except ImportError:
        return False
    return True


def check_builtin_window(window: tuple[int, ...], net_name: str) -> None:
    """The U-Net halves the window four times and instance-normalises the bottleneck."""
    if net_name in ("unet", "monai-unet") and any(w % 16 or w < 32 for w in window):
        raise ValueError(f"the built-in U-Net needs window sizes that are multiples of 16 and >= 32, "
                         f"got {tuple(window)}")


def export_builtin(out_dir: str | os.PathLike, *, window: tuple[int, int, int], classes: int,
                   net: str = "auto", seed: int = 0) -> tuple[Path, str]:
    """Export :func:`builtin_network` as a model package (CT normalisation); returns (dir, name)."""

    module, name = builtin_network(classes, net=net, seed=seed)
    check_builtin_window(window, name)
    path = export_model(module, out_dir, window=window, num_classes=int(classes), normalization=CT_NORMALIZATION)
    return Path(path), name


def maxrss_mib() -> float:
    """Peak resident memory of this process so far (``ru_maxrss``, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB: ``VmHWM`` (reset by :func:`reset_peak_rss`),
    else ``ru_maxrss``. ``VmHWM`` first because a child inherits its parent's ``ru_maxrss`` across
    fork + exec, so a parent that already held more hides the child's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return maxrss_mib()


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (``ru_maxrss``/VmHWM) to its current RSS.

    Linux (>= 4.0) only, through ``/proc/self/clear_refs``; returns False where that is not
    possible, and ``ru_maxrss`` then keeps the lifetime peak (a baseline taken from it can hide
    part of a later peak).
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the lifetime peak is all we have
        return int(maxrss_mib() * _MIB)


class PeakMemory:
    """Context manager sampling this process's resident set size on a background thread.

    torch and ONNX Runtime allocate outside Python's allocator, so ``tracemalloc`` misses them;
    RSS does not. Attributes after exit: ``start_mib``, ``peak_mib``, ``delta_mib``.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = float(interval_s)
        self.start_mib = self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="atso-bench-rss", daemon=True)

    @property
    def delta_mib(self) -> float:
        return max(self.peak_mib - self.start_mib, 0.0)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mib = max(self.peak_mib, _rss_bytes() / _MIB)

    def __enter__(self) -> Self:
        self.start_mib = self.peak_mib = _rss_bytes() / _MIB
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, _rss_bytes() / _MIB)


def monai_labels(net: Any, volume: np.ndarray, *, window: tuple[int, ...], batch: int, overlap: float,
                 device: str = "cpu", normalization: dict | None = None) -> np.ndarray:
    """The MONAI baseline: uint8 argmax of ``sliding_window_inference`` (gaussian, sigma 1/8).

    ``volume`` ``(Z, Y, X)`` in HU is normalised with ``normalization`` (default
    :data:`CT_NORMALIZATION`, the built-in package's policy) and run on ``device`` whole,
    accumulator included, as MONAI scripts do.
    """
    import torch
    from monai.inferers import sliding_window_inference


    policy = CT_NORMALIZATION if normalization is None else normalization
    x = torch.from_numpy(np.ascontiguousarray(normalize(volume, policy), dtype=np.float32))[None, None]
    with torch.inference_mode():
        logits = sliding_window_inference(x.to(device), tuple(window), int(batch), net, overlap=overlap,
                                          mode="gaussian", sigma_scale=0.125)
        return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


def window_batches(package: Any, volume: np.ndarray, overlap: Any, batch_size: int, device: str, *,
                   even: bool = False) -> list[Any]:
    """The engine's window batches for ``volume``, extracted once (normalised, on ``device``).

    Same grid and split as ``Relabeler._stream``: MONAI's full batches by default, near-equal
    ones with ``even=True`` (what a runtime with a dynamic batch, OpenVINO, runs; see
    ``batch_bounds``); each batch is shaped like the runtime's input ``(B, M, *window)``.
    """

    vol = np.ascontiguousarray(normalize(volume.reshape((-1, *volume.shape[-3:])), package.normalization),
                               dtype=np.float32)
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


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``atso-fast bench``."""
    p = make_parser("atso-fast bench", (
        "Seconds per volume, voxels/s, windows/s, peak memory, stitching overhead over the network "
        "alone, and label agreement with the float32 reference, per runtime and precision."))
    p.add_argument("model_dir", nargs="?", type=Path,
                   help="model package (model.json + model.onnx); default: export the built-in 3D U-Net")
    p.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"),
                   help="synthetic volume size (default 128^3 on cpu, 200x512x512 on cuda)")
    p.add_argument("--window", type=int, nargs=3, metavar=("Z", "Y", "X"),
                   help="built-in model only: window (default 64^3 on cpu, 96^3 on cuda)")
    p.add_argument("--runtimes", default="all", help="'all' or a comma list of " + ",".join(BENCH_RUNTIMES))
    p.add_argument("--precision", default=None,
                   help="comma list of float32,float16,bfloat16 or 'all' (default float32 on cpu, "
                        "float32,float16 on cuda)")
    p.add_argument("--batch-size", "--batch", dest="batch", type=int, default=4, help="windows per runtime call")
    p.add_argument("--overlap", type=float, default=0.5, help="window overlap in [0, 1)")
    p.add_argument("--classes", type=int, help="built-in model only: output classes (default 3)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per pair (median reported)")
    p.add_argument("--net", default="auto", choices=["auto", "unet", "convnet"],
                   help="built-in model only: architecture (auto = MONAI U-Net when installed)")
    p.add_argument("--seed", type=int, default=0, help="weights and phantom noise seed")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the torch rows (compile time is excluded: it happens in the warm-up)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def _csv(value: str, allowed: tuple[str, ...], name: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if value.strip() == "all":
        return allowed
    bad = [v for v in items if v not in allowed]
    if not items or bad:
        raise ValueError(f"{name} must be 'all' or a comma list of {','.join(allowed)}, got {value!r}")
    return items


def _positive(values: Any, name: str) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    if min(out) < 1:
        raise ValueError(f"{name} must be positive, got {' '.join(map(str, out))}")
    return out


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Validate parsed arguments into a :class:`BenchConfig`.

    Raises:
        ValueError: naming the option and the value received.
    """

    device = check_device(args.device)
    check_overlap(args.overlap)
    if args.model_dir is not None and (args.window is not None or args.classes is not None):
        raise ValueError("--window and --classes describe the built-in model; a MODEL_DIR package "
                         f"({args.model_dir}) brings its own")
    cuda = device.startswith("cuda")
    shape = _positive(args.shape or ((200, 512, 512) if cuda else (128, 128, 128)), "--shape")
    window = _positive(args.window or default_window(device), "--window")
    classes, batch, repeats = (_positive([v], n)[0] for v, n in (
        (3 if args.classes is None else args.classes, "--classes"), (args.batch, "--batch"),
        (args.repeats, "--repeats")))
    precisions = _csv(args.precision or ("float32,float16" if cuda else "float32"), _PRECISIONS, "--precision")
    return BenchConfig(args.model_dir, shape, window, _csv(args.runtimes, BENCH_RUNTIMES, "--runtimes"),
                       precisions, batch, float(args.overlap), classes, device, repeats, args.net, int(args.seed),
                       bool(args.compile))


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


def _make_relabeler(cfg: BenchConfig, model_dir: Path, runtime: str, precision: str,
                    compile: bool = False) -> tuple[Any, str | None]:
    """A relabeler, or ``(None, reason)`` when the pair cannot run here."""

    try:
        return Relabeler(model_dir, runtime=runtime, device=cfg.device, overlap=cfg.overlap,
                         batch_size=cfg.batch, precision=precision, compile=compile), None
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
            vol_times += time_repeats(lambda: stages.append(rel.relabel_volume(volume).stats.get("timings") or {}),
                                      1, dev)
            net_times += time_repeats(lambda: run_batches(rel.runtime, batches), 1, dev)
            if depth > 1 and getattr(rel.runtime, "streams", 1) == 1:  # two streams, one batch: half the threads
                seq_times += _sequential(rel, volume, dev)
    seconds, network = statistics.median(vol_times), statistics.median(net_times)
    stage_seconds = {k: statistics.median(st[k] for st in stages) for k in stages[0]} if stages and stages[0] else None
    windows = sum(int(b.shape[0]) for b in batches)
    seq = statistics.median(seq_times) if seq_times else None
    return {"seconds": seconds, "seconds_all": vol_times, "voxels_per_s": float(np.prod(cfg.shape)) / seconds,
            "windows_per_s": windows / seconds, "network_seconds": network, "network_seconds_all": net_times,
            "overhead": (seconds - network) / network, "overhead_min": min(vol_times) / min(net_times) - 1.0,
            "in_flight": depth, "sequential_seconds": seq, "sequential_seconds_all": seq_times or None,
            "sequential_overhead": None if seq is None else (seq - network) / network,
            "peak_host_mib": mem.peak_mib, "host_delta_mib": mem.delta_mib, "device_peak_mib": dev.peak_mib(),
            "stage_seconds": stage_seconds}


def _sequential(rel: Any, volume: np.ndarray, dev: Device) -> list[float]:
    """One volume with one batch in flight (no overlap of network and stitching)."""
    depth = rel.runtime.in_flight
    rel.runtime.in_flight = 1
    try:
        return time_repeats(lambda: rel.relabel_volume(volume), 1, dev)
    finally:
        rel.runtime.in_flight = depth


def _row(runtime: str, precision: str, status: str, **fields: Any) -> dict[str, Any]:
    return {"runtime": runtime, "precision": precision, "status": status, "reason": None,
            "correct": None, "agreement": None, **fields}


def _bench_pair(cfg: BenchConfig, rel: Any, runtime: str, precision: str, volume: np.ndarray,
                reference: np.ndarray, batches: list[Any]) -> dict[str, Any]:
    """Warm-up + correctness, then (only if correct) the timings."""
    try:
        labels = rel.relabel_volume(volume).labels
        agreement = float(np.mean(labels == reference))
        if agreement < MIN_AGREEMENT[precision]:
            return _row(runtime, precision, "incorrect", correct=False, agreement=agreement,
                        reason=f"label agreement {agreement:.6f} < {MIN_AGREEMENT[precision]}")
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
    path, name = export_builtin(scratch / "model", window=cfg.window, classes=cfg.classes, net=cfg.net,
                                seed=cfg.seed)
    return path, f"builtin:{name}"


def _machine(device: str) -> dict[str, Any]:
    import torch


    info = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "native": native.build_info()}
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _run_pairs(cfg: BenchConfig, model_dir: Path, volume: np.ndarray, reference: np.ndarray,
               splits: Callable[[bool], list[Any]], cache: dict) -> list[dict[str, Any]]:
    """One row per runtime/precision pair, in ``cfg`` order; one relabeler alive at a time.

    ``splits(even)`` gives the window batches; each runtime's network-alone time runs the split
    its relabel pass runs (near-equal batches for a dynamic batch), so that the overhead column
    holds stitching and waiting only."""
    rows = []
    pairs = [(r, p) for r in cfg.runtimes for p in cfg.precisions]
    progress = Progress("bench: runtime/precision pairs", len(pairs), unit="pair", every=0.0)
    for runtime, precision in pairs:
        progress.update(len(rows), f"next {runtime}/{precision}, {cfg.repeats} timed runs")
        compile = cfg.compile and runtime == "torch"
        rel, reason = cache.pop((runtime, precision), None), None
        if rel is None or compile:  # the cached reference relabeler is not compiled
            rel, reason = _make_relabeler(cfg, model_dir, runtime, precision, compile)
        rows.append(_row(runtime, precision, "skipped", reason=reason) if rel is None else
                    _bench_pair(cfg, rel, runtime, precision, volume, reference,
                                splits(rel.runtime.dynamic_batch)))
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
        raise RuntimeError(f"device {cfg.device!r} needs a CUDA GPU and a CUDA build (build_info: "
                           f"{native.build_info()})")
    with tempfile.TemporaryDirectory(prefix="atso-bench-") as scratch:
        model_dir, source = _model_dir(cfg, Path(scratch))
        package = load_package(model_dir)
        volume = synthetic_ct(cfg.shape, cfg.seed)
        cache: dict[tuple[str, str], Any] = {}
        ref_name, reference = _reference(cfg, model_dir, volume, cache)
        wanted = {(r, p) for r in cfg.runtimes for p in cfg.precisions}
        cache = {k: v for k, v in cache.items() if k in wanted}  # drop an unrequested reference
        splits = functools.cache(lambda even: window_batches(package, volume, cfg.overlap, cfg.batch,
                                                             cfg.device, even=even))
        rows = _run_pairs(cfg, model_dir, volume, reference, splits, cache)
    ran = [r for r in rows if r["status"] != "skipped"]
    return {"config": {**asdict(cfg), "model_dir": str(cfg.model_dir) if cfg.model_dir else None},
            "model": {"source": source, "window": list(package.window), "classes": package.num_classes,
                      "windows": len(sliding_window_origins(volume.shape[-3:], package.window3d, cfg.overlap))},
            "reference": ref_name, "machine": _machine(cfg.device), "results": rows,
            "correct": bool(ran) and all(r["correct"] for r in ran)}


# --------------------------------------------------------------------------- output
_COLUMNS = (("runtime", "{}"), ("precision", "{}"), ("s/volume", "{:.3f}"), ("Mvox/s", "{:.2f}"),
            ("windows/s", "{:.1f}"), ("network s", "{:.3f}"), ("overhead", "{:+.1%}"),
            ("in flight", "{}"), ("seq overhead", "{:+.1%}"),
            ("peak RSS MiB", "{:.0f}"), ("+RSS MiB", "{:.0f}"), ("GPU MiB", "{:.0f}"),
            ("agreement", "{:.5f}"), ("correct", "{}"))
_GPU_COLUMN = 11


def _cells(row: dict[str, Any], cuda: bool) -> list[str]:
    values = [row["runtime"], row["precision"], row.get("seconds"),
              row["voxels_per_s"] / 1e6 if row.get("voxels_per_s") else None, row.get("windows_per_s"),
              row.get("network_seconds"), row.get("overhead"), row.get("in_flight"), row.get("sequential_overhead"),
              row.get("peak_host_mib"), row.get("host_delta_mib"), row.get("device_peak_mib"), row["agreement"],
              row["correct"]]
    cells = [fmt.format(v) if v is not None else "-" for (_, fmt), v in zip(_COLUMNS, values)]
    return cells if cuda else cells[:_GPU_COLUMN] + cells[_GPU_COLUMN + 1:]


def format_table(report: dict[str, Any]) -> str:
    """The human-readable table: ran pairs, then skipped/failed pairs with their reasons."""
    cfg, model = report["config"], report["model"]
    cuda = cfg["device"].startswith("cuda")
    head = [name for name, _ in _COLUMNS]
    head = head if cuda else head[:_GPU_COLUMN] + head[_GPU_COLUMN + 1:]
    ran = [r for r in report["results"] if r["status"] in ("ok", "incorrect")]
    rows = [head] + [_cells(r, cuda) for r in ran]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [(f"model {model['source']}, window {'x'.join(map(str, model['window']))}, {model['classes']} classes; "
              f"volume {'x'.join(map(str, cfg['shape']))}, {model['windows']} windows (overlap {cfg['overlap']}, "
              f"batch {cfg['batch']}), device {cfg['device']}{', torch compiled' if cfg.get('compile') else ''}, "
              f"median of {cfg['repeats']}; "
              f"reference {report['reference']}"),
             "overhead = (s/volume - network s) / network s: the network alone ran the same window batches; "
             "seq overhead: the same relabeler with one batch in flight (no overlap of network and stitching)"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    for r in ran:
        if r.get("stage_seconds"):
            lines.append(f"{r['runtime']}/{r['precision']} seconds inside relabel_volume (median): "
                         + ", ".join(f"{k} {v:.3f}" for k, v in r["stage_seconds"].items()))
    for r in report["results"]:
        if r["status"] in ("skipped", "failed", "incorrect"):
            lines.append(f"{r['status']}: {r['runtime']}/{r['precision']}: {r['reason']}")
    return "\n".join(lines)


def cli_main(argv: list[str] | None = None) -> int:
    """``atso-fast bench [MODEL_DIR] [options]``: 0 when every pair that ran is correct, 1 when
    one is incorrect or failed, 2 on bad usage or a model package that cannot be loaded."""
    try:
        args = build_parser().parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help (0) or an argparse usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        report = run_bench(config_from_args(args))
    except (ValueError, RuntimeError, ImportError) as exc:
        print(f"atso-fast bench: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_table(report))
    return 0 if report["correct"] else 1
