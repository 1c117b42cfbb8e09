"""``atso-fast bench --scenes``: frames/s of the relabel pass on 2D RGB driving scenes, beside a
plain torch loop and MONAI's ``sliding_window_inference`` over the same network, in one run.

The network is the caller's (``atso-fast bench`` passes a seeded ResNet U-Net; this module sits
below ``atso_fast.train`` and does not build one): it is exported as a 2D RGB package with
ImageNet normalisation to a temporary folder, and ``frames`` procedural street scenes
(:func:`atso_fast.datasets.driving.make_scene`, uint8 RGB) are relabelled by three sides:

* ``ours``: :class:`~atso_fast.engine.Relabeler` on the package (``runtime``, ``auto`` by default),
  each frame passed as ``atso-fast relabel`` passes a decoded PNG: ``(3, 1, H, W)`` uint8;
* ``torch loop``: the engine's window origins for the frame, cut from the frame normalised in
  torch, batched through the same torch module under ``torch.inference_mode()``, blended with
  the engine's gaussian into a full-frame accumulator, argmax (what a torchvision user writes);
* ``monai``: ``sliding_window_inference(roi_size=window, sw_batch_size=batch, overlap,
  mode="gaussian")`` on the normalised frame, argmax.

Every side starts from the same uint8 frames and ends at labels; normalisation is inside each
timed region. One warm-up pass over all frames gives each side's labels; when ours agrees with
the torch loop or MONAI on fewer than :data:`SCENE_MIN_AGREEMENT` of a frame's pixels the run is
reported as incorrect and not timed. Then every repeat times each side over all frames, the
sides interleaved (their order rotated per repeat) so that load from other processes hits all
alike; frames/s is ``frames / median seconds``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from atso_fast.bench.memory import peak_rss_mib, reset_peak_rss
from atso_fast.bench.runner import Device, machine_info, time_repeats
from atso_fast.datasets.driving import make_scene
from atso_fast.engine.relabeler import Relabeler
from atso_fast.engine.windows import check_overlap, grid_importance, grid_origins
from atso_fast.package import ModelPackage, export_model, load_package
from atso_fast.package.normalize import IMAGENET_RGB
from atso_fast.runtimes import RUNTIMES
from atso_fast.runtimes.torch_rt import torch_threads

if TYPE_CHECKING:
    import torch

__all__ = [
    "SCENE_MIN_AGREEMENT",
    "SIDES",
    "NetworkFactory",
    "SceneBenchConfig",
    "make_frames",
    "frame_origins",
    "torch_loop_labels",
    "monai_labels",
    "run_scene_bench",
]

SCENE_MIN_AGREEMENT = 0.999
"""Least per-frame label agreement of ours with the torch loop and with MONAI (float32; the same
network and window maths on both sides) below which the run is incorrect and not timed."""
SIDES = ("ours", "torch loop", "monai")
"""The three sides, in table order."""


def _pair(value: Any, name: str) -> tuple[int, int]:
    """``(H, W)`` of two positive ints, or a ValueError showing ``value``."""
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 2 or min(out) < 1:
        raise ValueError(f"{name} must be 2 positive sizes (H, W), got {value!r}")
    return out[0], out[1]


@dataclass
class SceneBenchConfig:
    """Options of one scene benchmark (validated on construction).

    Attributes:
        frames: procedural frames relabelled per timed run.
        frame_size: ``(H, W)`` of each frame; at least the window on both axes.
        window: ``(h, w)`` network window.
        classes, layers, decoder_channels, seed: the network the factory builds (seeded weights;
            ``seed`` also draws the frames).
        threads: CPU threads of every side (ours: the runtime's; torch loop, MONAI: torch's
            intra-op threads); None: the libraries' defaults (all cores).

    Raises:
        ValueError: naming the option and the value received.
    """

    frames: int = 8
    frame_size: tuple[int, int] = (512, 1024)
    window: tuple[int, int] = (512, 512)
    overlap: float = 0.5
    batch: int = 4
    classes: int = 19
    layers: int = 18
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    seed: int = 0
    repeats: int = 3
    runtime: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        self.frame_size, self.window = _pair(self.frame_size, "frame_size"), _pair(self.window, "window")
        for name in ("frames", "batch", "classes", "repeats"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and int(self.threads) < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, (int, float)):
            raise ValueError(f"overlap must be one number in [0, 1), got {self.overlap!r}")
        self.overlap = check_overlap(self.overlap)[0]
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if any(f < w for f, w in zip(self.frame_size, self.window)):
            raise ValueError(
                f"frame size {self.frame_size[0]}x{self.frame_size[1]} is smaller than the window "
                f"{self.window[0]}x{self.window[1]} on an axis: the benchmark needs frames at least one "
                "window large (the engine and MONAI would pad such a frame; the plain torch loop does not)"
            )
        self.decoder_channels = tuple(int(c) for c in self.decoder_channels)


NetworkFactory = Callable[[SceneBenchConfig], "tuple[torch.nn.Module, str]"]
"""``build(cfg) -> (module in eval mode mapping (B, 3, *window) to (B, classes, *window), name)``."""


# --------------------------------------------------------------------------- inputs
def make_frames(cfg: SceneBenchConfig) -> list[np.ndarray]:
    """``cfg.frames`` day scenes ``(3, 1, H, W)`` uint8 (channels, one slice: a decoded PNG's
    layout), scenes ``(cfg.seed, k)``."""
    height, width = cfg.frame_size
    frames = []
    for k in range(cfg.frames):
        rgb, _ = make_scene(cfg.seed, k, height=height, width=width)
        frames.append(np.ascontiguousarray(np.moveaxis(rgb, -1, 0)[:, None]))
    return frames


def frame_origins(package: ModelPackage, frame_size: tuple[int, int], overlap: float) -> np.ndarray:
    """The engine's window origins ``(N, 2)`` (y, x) for a frame, in its order."""
    grid = package.preprocessing["grid"]
    return grid_origins(grid, (1, *frame_size), package.window3d, overlap)[:, 1:]


# --------------------------------------------------------------------------- the baselines
def _normalised(frame: np.ndarray, policy: dict[str, Any]) -> torch.Tensor:
    """``(3, H, W)`` uint8 -> float32 ``(x - mean) / std`` per channel, in torch."""
    import torch

    mean = torch.tensor(policy["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(policy["std"], dtype=torch.float32).view(-1, 1, 1)
    return (torch.from_numpy(frame).float() - mean) / std


def torch_loop_labels(
    module: Any, frame: np.ndarray, origins: np.ndarray, package: ModelPackage, batch: int
) -> np.ndarray:
    """Labels ``(H, W)`` of ``frame (3, H, W)`` uint8 by a plain torch sliding window.

    The windows at ``origins`` (inside the frame) run ``batch`` at a time; their logits,
    weighted by the package's gaussian, are summed into a ``(C, H, W)`` accumulator and divided
    by the summed weights, then argmax.
    """
    import torch

    h, w = package.window
    weight = torch.from_numpy(grid_importance(package.preprocessing["grid"], package.window).reshape(h, w).copy())
    with torch.inference_mode():
        x = _normalised(frame, package.normalization)
        acc = torch.zeros(package.num_classes, *x.shape[1:])
        wsum = torch.zeros(x.shape[1:])
        for start in range(0, len(origins), batch):
            chunk = origins[start : start + batch].tolist()
            logits = module(torch.stack([x[:, y : y + h, z : z + w] for y, z in chunk]))
            for (y, z), out in zip(chunk, logits):
                acc[:, y : y + h, z : z + w] += out * weight
                wsum[y : y + h, z : z + w] += weight
        return (acc / wsum).argmax(0).numpy()


def monai_labels(module: Any, frame: np.ndarray, package: ModelPackage, batch: int, overlap: float) -> np.ndarray:
    """Labels ``(H, W)`` of ``frame (3, H, W)`` uint8 by MONAI's ``sliding_window_inference``
    (gaussian blending, the frame normalised in torch)."""
    import torch
    from monai.inferers import sliding_window_inference

    with torch.inference_mode():
        x = _normalised(frame, package.normalization)[None]
        out = sliding_window_inference(
            x, roi_size=package.window, sw_batch_size=batch, predictor=module, overlap=overlap, mode="gaussian"
        )
        return torch.as_tensor(out)[0].argmax(0).numpy()


# --------------------------------------------------------------------------- measuring
def _agreement(ours: list[np.ndarray], other: list[np.ndarray]) -> dict[str, Any]:
    per_frame = [float(np.mean(a == b)) for a, b in zip(ours, other)]
    return {"mean": float(np.mean(per_frame)), "min": min(per_frame), "per_frame": per_frame}


def _time_sides(sides: dict[str, Callable[[np.ndarray], Any]], frames: list[np.ndarray], repeats: int) -> dict:
    """Seconds over all frames per side and repeat, the sides interleaved (order rotated per
    repeat), and each side's peak resident memory and its rise over the resident memory at the
    run's start (``VmHWM`` reset before each run, the largest over the repeats; None where it
    cannot be reset). The three sides share one process, so the peaks share its baseline (the
    libraries, the runtime's compiled model, the frames): the rise is what a side adds."""
    names, dev = list(sides), Device("cpu")
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, float | None] = dict.fromkeys(names)
    rises: dict[str, float | None] = dict.fromkeys(names)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fresh = reset_peak_rss()
            start = peak_rss_mib()  # just reset: the resident memory now
            times[name] += time_repeats(lambda fn=sides[name]: [fn(f) for f in frames], 1, dev)
            if fresh:
                peak = peak_rss_mib()
                peaks[name] = max(peaks[name] or 0.0, peak)
                rises[name] = max(rises[name] or 0.0, peak - start)
    return {"seconds": times, "peak_host_mib": peaks, "host_rise_mib": rises}


def _side_rows(timed: dict | None, frames: int, agreement: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name in SIDES:
        seconds = timed["seconds"][name] if timed else None
        median = statistics.median(seconds) if seconds else None
        rows.append(
            {
                "side": name,
                "frames_per_s": frames / median if median else None,
                "seconds": median,
                "seconds_all": seconds,
                "peak_host_mib": timed["peak_host_mib"][name] if timed else None,
                "host_rise_mib": timed["host_rise_mib"][name] if timed else None,
                "agreement_with_ours": agreement.get(f"ours_vs_{name.replace(' ', '_')}"),
            }
        )
    return rows


def _ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    fps = {r["side"]: r["frames_per_s"] for r in rows}
    ours = fps["ours"]
    return {
        f"ours_vs_{n.replace(' ', '_')}": ours / fps[n] if ours and fps[n] else None for n in ("torch loop", "monai")
    }


def _measure(cfg: SceneBenchConfig, module: Any, package_dir: Path, frames: list[np.ndarray]) -> dict[str, Any]:
    """Warm-up and agreement, then (when correct) the interleaved timings."""
    package = load_package(package_dir)
    rel = Relabeler(package_dir, runtime=cfg.runtime, overlap=cfg.overlap, batch_size=cfg.batch, threads=cfg.threads)
    origins = frame_origins(package, cfg.frame_size, cfg.overlap)
    sides: dict[str, Callable[[np.ndarray], Any]] = {
        "ours": lambda f: rel.relabel_volume(f).labels[0],
        "torch loop": lambda f: torch_loop_labels(module, f[:, 0], origins, package, cfg.batch),
        "monai": lambda f: monai_labels(module, f[:, 0], package, cfg.batch, cfg.overlap),
    }
    labels = {name: [fn(f) for f in frames] for name, fn in sides.items()}  # the warm-up
    agreement = {
        "ours_vs_torch_loop": _agreement(labels["ours"], labels["torch loop"]),
        "ours_vs_monai": _agreement(labels["ours"], labels["monai"]),
        "torch_loop_vs_monai": _agreement(labels["torch loop"], labels["monai"]),
    }
    low = {k: v["min"] for k, v in agreement.items() if k.startswith("ours") and v["min"] < SCENE_MIN_AGREEMENT}
    timed = None if low else _time_sides(sides, frames, cfg.repeats)
    rows = _side_rows(timed, cfg.frames, agreement)
    return {
        "runtime": rel.runtime_name,
        "runtime_reason": rel.runtime_reason,
        "windows_per_frame": len(origins),
        "sides": rows,
        "ratios": _ratios(rows),
        "agreement": agreement,
        "correct": not low,
        "reason": None if not low else f"per-frame label agreement below {SCENE_MIN_AGREEMENT}: {low}",
    }


def run_scene_bench(cfg: SceneBenchConfig, build_network: NetworkFactory) -> dict[str, Any]:
    """Run the scene benchmark; returns the report (``atso-fast bench --scenes --json``).

    Args:
        cfg: the options.
        build_network: the network's factory (see :data:`NetworkFactory`).

    Raises:
        ValueError: a network that does not fit the window (from the factory or the export).
        atso_fast.PackageError: the export failed (ONNX and torch disagree, wrong output shape).
    """
    frames = make_frames(cfg)
    module, name = build_network(cfg)
    load_before = os.getloadavg()
    with torch_threads(cfg.threads), tempfile.TemporaryDirectory(prefix="atso-bench-scenes-") as scratch:
        package_dir = export_model(
            module,
            Path(scratch) / "model",
            window=cfg.window,
            num_classes=cfg.classes,
            normalization=IMAGENET_RGB,
            in_channels=3,
        )
        measured = _measure(cfg, module, package_dir, frames)
    machine = {**machine_info("cpu"), "load_before": list(load_before), "load_after": list(os.getloadavg())}
    return {"config": asdict(cfg), "network": name, **measured, "machine": machine}
