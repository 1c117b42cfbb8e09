"""``atso-fast bench``: the command line (options -> :class:`~atso_fast.bench.runner.BenchConfig`,
or with ``--scenes`` :class:`~atso_fast.bench.scenes.SceneBenchConfig`; the report as a table or
JSON). The scene benchmark's network, a seeded ResNet U-Net, is built here: ``atso_fast.bench``
sits below ``atso_fast.train`` and takes it as a factory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from atso_fast.bench.networks import default_window
from atso_fast.bench.runner import _PRECISIONS, BENCH_RUNTIMES, BenchConfig, run_bench
from atso_fast.bench.scenes import SIDES, SceneBenchConfig, run_scene_bench
from atso_fast.cli.common import make_parser, parse_or_status
from atso_fast.engine.agreement import RECORD_KEY, agreement_table
from atso_fast.engine.windows import check_overlap
from atso_fast.package import load_package
from atso_fast.runtimes import RUNTIMES
from atso_fast.runtimes.base import check_device
from atso_fast.train.resnet_unet import ResNetUNet

__all__ = [
    "build_parser",
    "config_from_args",
    "scene_config_from_args",
    "scene_network",
    "format_table",
    "format_scene_table",
    "cli_main",
]

_SCENE_ONLY = ("frames", "frame_size", "runtime", "threads")
"""Options (argparse dests) of ``--scenes`` only."""
_VOLUME_ONLY = ("model_dir", "shape", "runtimes", "precision", "net", "compile")
"""Options of the volume benchmark only."""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``atso-fast bench``."""
    p = make_parser(
        "atso-fast bench",
        (
            "Seconds per volume, voxels/s, windows/s, peak memory, stitching overhead over the network "
            "alone, and label agreement with the float32 reference, per runtime and precision. With "
            "--scenes: frames/s of the relabel pass on 2D RGB driving scenes beside a plain torch loop "
            "and MONAI's sliding_window_inference over the same ResNet U-Net, in one run."
        ),
    )
    p.add_argument(
        "model_dir",
        nargs="?",
        type=Path,
        help="model package (model.json + model.onnx); default: export the built-in 3D U-Net",
    )
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="synthetic volume size (default 128^3 on cpu, 200x512x512 on cuda)",
    )
    p.add_argument(
        "--window",
        type=int,
        nargs="+",
        metavar="N",
        help="built-in model only: window Z Y X (default 64^3 on cpu, 96^3 on cuda); "
        "with --scenes H W (default 512 512)",
    )
    p.add_argument("--runtimes", help="'all' (default) or a comma list of " + ",".join(BENCH_RUNTIMES))
    p.add_argument(
        "--precision",
        default=None,
        help="comma list of float32,float16,bfloat16 or 'all' (default float32 on cpu, float32,float16 on cuda)",
    )
    p.add_argument("--batch-size", "--batch", dest="batch", type=int, default=4, help="windows per runtime call")
    p.add_argument("--overlap", type=float, default=0.5, help="window overlap in [0, 1)")
    p.add_argument("--classes", type=int, help="built-in model only: output classes (default 3; 19 with --scenes)")
    p.add_argument("--device", help="cpu (default), cuda or cuda:N")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per pair (median reported)")
    p.add_argument(
        "--net",
        choices=["auto", "unet", "convnet"],
        help="built-in model only: architecture (auto = MONAI U-Net when installed)",
    )
    p.add_argument("--seed", type=int, default=0, help="weights and phantom noise seed")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the torch rows (compile time is excluded: it happens in the warm-up)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    _scene_options(p)
    return p


def _scene_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "2D RGB scenes (--scenes)",
        "ours (the Relabeler on the exported package) vs a plain torch loop over the same windows vs "
        "MONAI's sliding_window_inference, one seeded ResNet-18 U-Net, procedural driving frames, CPU",
    )
    g.add_argument("--scenes", action="store_true", help="run the scene benchmark instead of the volume one")
    g.add_argument("--frames", type=int, help="frames per timed run (default 8)")
    g.add_argument("--frame-size", type=int, nargs=2, metavar=("H", "W"), help="frame size (default 512 1024)")
    g.add_argument("--runtime", choices=RUNTIMES, help="runtime of the relabel pass (default auto)")
    g.add_argument("--threads", type=int, help="CPU threads of every side (default: the libraries' own, all cores)")


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


def _positive_zyx(values: Any, name: str) -> tuple[int, int, int]:
    out = _positive(values, name)
    if len(out) != 3:
        raise ValueError(f"{name} takes 3 values (Z Y X), got {' '.join(map(str, out))}")
    z, y, x = out
    return z, y, x


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Validate parsed arguments into a :class:`BenchConfig`.

    Raises:
        ValueError: naming the option and the value received.
    """

    _refuse(args, _SCENE_ONLY, "belong to --scenes")
    device = check_device(args.device or "cpu")
    check_overlap(args.overlap)
    if args.model_dir is not None and (args.window is not None or args.classes is not None):
        raise ValueError(
            f"--window and --classes describe the built-in model; a MODEL_DIR package ({args.model_dir}) brings its own"
        )
    cuda = device.startswith("cuda")
    shape = _positive_zyx(args.shape or ((200, 512, 512) if cuda else (128, 128, 128)), "--shape")
    window = _positive_zyx(args.window or default_window(device), "--window")
    classes, batch, repeats = (
        _positive([v], n)[0]
        for v, n in (
            (3 if args.classes is None else args.classes, "--classes"),
            (args.batch, "--batch"),
            (args.repeats, "--repeats"),
        )
    )
    precisions = _csv(args.precision or ("float32,float16" if cuda else "float32"), _PRECISIONS, "--precision")
    return BenchConfig(
        args.model_dir,
        shape,
        window,
        _csv(args.runtimes or "all", BENCH_RUNTIMES, "--runtimes"),
        precisions,
        batch,
        float(args.overlap),
        classes,
        device,
        repeats,
        args.net or "auto",
        int(args.seed),
        bool(args.compile),
    )


def _refuse(args: argparse.Namespace, dests: tuple[str, ...], why: str) -> None:
    given = [
        "MODEL_DIR" if d == "model_dir" else "--" + d.replace("_", "-")
        for d in dests
        if getattr(args, d) not in (None, False)
    ]
    if given:
        raise ValueError(f"{', '.join(given)}: {why}")


def scene_config_from_args(args: argparse.Namespace) -> SceneBenchConfig:
    """Validate parsed ``--scenes`` arguments into a :class:`SceneBenchConfig` (its defaults for
    what is not given).

    Raises:
        ValueError: an option of the volume benchmark, or a value out of range (named).
    """
    _refuse(args, _VOLUME_ONLY, "the volume benchmark's, not --scenes'")
    if args.device not in (None, "cpu"):
        raise ValueError(f"--scenes runs on the CPU, got --device {args.device}")
    given = {
        "frames": args.frames,
        "frame_size": args.frame_size,
        "window": args.window,
        "classes": args.classes,
        "runtime": args.runtime,
        "threads": args.threads,
    }
    return SceneBenchConfig(
        overlap=args.overlap,
        batch=args.batch,
        seed=args.seed,
        repeats=args.repeats,
        **{k: v for k, v in given.items() if v is not None},
    )


def scene_network(cfg: SceneBenchConfig) -> tuple[Any, str]:
    """The scene benchmark's network: a ResNet U-Net (``cfg.layers``, ``cfg.decoder_channels``)
    with weights seeded by ``cfg.seed`` (torch's global RNG left as it was), in eval mode.

    Raises:
        ValueError: a window that is not a multiple of the network's divisor (32).
    """
    import torch

    if any(w % ResNetUNet.divisor for w in cfg.window):
        raise ValueError(
            f"--window {cfg.window[0]} {cfg.window[1]}: the ResNet U-Net needs multiples of "
            f"{ResNetUNet.divisor} (five stride-2 stages)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = ResNetUNet(cfg.classes, depth=cfg.layers, decoder_channels=cfg.decoder_channels)
    return net.eval(), f"resnet{cfg.layers}-unet"


# --------------------------------------------------------------------------- output
_COLUMNS = (
    ("runtime", "{}"),
    ("precision", "{}"),
    ("s/volume", "{:.3f}"),
    ("Mvox/s", "{:.2f}"),
    ("windows/s", "{:.1f}"),
    ("network s", "{:.3f}"),
    ("overhead", "{:+.1%}"),
    ("in flight", "{}"),
    ("seq overhead", "{:+.1%}"),
    ("peak RSS MiB", "{:.0f}"),
    ("+RSS MiB", "{:.0f}"),
    ("GPU MiB", "{:.0f}"),
    ("agreement", "{:.5f}"),
    ("correct", "{}"),
)
_GPU_COLUMN = 11


def _cells(row: dict[str, Any], cuda: bool) -> list[str]:
    values = [
        row["runtime"],
        row["precision"],
        row.get("seconds"),
        row["voxels_per_s"] / 1e6 if row.get("voxels_per_s") else None,
        row.get("windows_per_s"),
        row.get("network_seconds"),
        row.get("overhead"),
        row.get("in_flight"),
        row.get("sequential_overhead"),
        row.get("peak_host_mib"),
        row.get("host_delta_mib"),
        row.get("device_peak_mib"),
        row["agreement"],
        row["correct"],
    ]
    cells = [fmt.format(v) if v is not None else "-" for (_, fmt), v in zip(_COLUMNS, values)]
    return cells if cuda else cells[:_GPU_COLUMN] + cells[_GPU_COLUMN + 1 :]


def format_table(report: dict[str, Any]) -> str:
    """The human-readable table: ran pairs, then skipped/failed pairs with their reasons."""
    cfg, model = report["config"], report["model"]
    cuda = cfg["device"].startswith("cuda")
    head = [name for name, _ in _COLUMNS]
    head = head if cuda else head[:_GPU_COLUMN] + head[_GPU_COLUMN + 1 :]
    ran = [r for r in report["results"] if r["status"] in ("ok", "incorrect")]
    rows = [head] + [_cells(r, cuda) for r in ran]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        (
            f"model {model['source']}, window {'x'.join(map(str, model['window']))}, {model['classes']} classes; "
            f"volume {'x'.join(map(str, cfg['shape']))}, {model['windows']} windows (overlap {cfg['overlap']}, "
            f"batch {cfg['batch']}), device {cfg['device']}{', torch compiled' if cfg.get('compile') else ''}, "
            f"median of {cfg['repeats']}; "
            f"reference {report['reference']}"
        ),
        "overhead = (s/volume - network s) / network s: the network alone ran the same window batches; "
        "seq overhead: the same relabeler with one batch in flight (no overlap of network and stitching)",
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    for r in ran:
        if r.get("stage_seconds"):
            lines.append(
                f"{r['runtime']}/{r['precision']} seconds inside relabel_volume (median): "
                + ", ".join(f"{k} {v:.3f}" for k, v in r["stage_seconds"].items())
            )
    for r in report["results"]:
        if r["status"] in ("skipped", "failed", "incorrect"):
            lines.append(f"{r['status']}: {r['runtime']}/{r['precision']}: {r['reason']}")
    return "\n".join(lines)


def _scene_cells(row: dict[str, Any]) -> list[str]:
    agree = row["agreement_with_ours"]
    values = [
        (row["side"], "{}"),
        (row["frames_per_s"], "{:.3f}"),
        (row["seconds"], "{:.2f}"),
        (row["peak_host_mib"], "{:.0f}"),
        (row["host_rise_mib"], "{:.0f}"),
        (agree and agree["mean"], "{:.5f}"),
        (agree and agree["min"], "{:.5f}"),
    ]
    return [fmt.format(v) if v is not None else "-" for v, fmt in values]


def format_scene_table(report: dict[str, Any]) -> str:
    """The ``--scenes`` table: one row per side, then the ratios and the runtime ours used."""
    cfg, ratios = report["config"], report["ratios"]
    rows = [["side", "frames/s", "s/run", "peak RSS MiB", "+RSS MiB", "agree mean", "agree min"]]
    rows += [_scene_cells(r) for r in report["sides"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    size, window = "x".join(map(str, cfg["frame_size"])), "x".join(map(str, cfg["window"]))
    lines = [
        f"{report['network']} ({cfg['classes']} classes, seeded random weights), window {window}; "
        f"{cfg['frames']} frames {size}, {report['windows_per_frame']} windows/frame (overlap {cfg['overlap']}, "
        f"batch {cfg['batch']}); threads {cfg['threads'] or 'default'}; s/run = all frames, median of "
        f"{cfg['repeats']} interleaved runs; +RSS: a side's rise over the shared process; agree = label "
        "agreement with ours per frame",
        f"ours: Relabeler, runtime {report['runtime']} ({report['runtime_reason']}); torch loop: the same "
        "windows and gaussian in plain torch; monai: sliding_window_inference",
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if report["correct"]:
        lines.append(
            "frames/s ratio (same run): "
            + ", ".join(f"ours / {n}: {ratios['ours_vs_' + n.replace(' ', '_')]:.2f}x" for n in SIDES[1:])
        )
    else:
        lines.append(f"incorrect, not timed: {report['reason']}")
    return "\n".join(lines)


def _scenes_main(args: argparse.Namespace) -> int:
    try:
        report = run_scene_bench(scene_config_from_args(args), scene_network)
    except (ValueError, RuntimeError, ImportError) as exc:
        print(f"atso-fast bench: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_scene_table(report))
    return 0 if report["correct"] else 1


def cli_main(argv: list[str] | None = None) -> int:
    """``atso-fast bench [MODEL_DIR] [options]`` (or ``--scenes``): 0 when every pair that ran is
    correct (the scenes agree), 1 when one is incorrect or failed, 2 on bad usage or a model
    package that cannot be loaded."""
    args = parse_or_status(build_parser(), argv)
    if isinstance(args, int):
        return args
    if args.scenes:
        return _scenes_main(args)
    try:
        report = run_bench(config_from_args(args))
    except (ValueError, RuntimeError, ImportError) as exc:
        print(f"atso-fast bench: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_table(report))
    if args.model_dir is not None and not args.json:  # what export/import measured, and auto's choice
        record = load_package(args.model_dir).extra.get(RECORD_KEY)
        if isinstance(record, dict):
            print(agreement_table(record))
    return 0 if report["correct"] else 1
