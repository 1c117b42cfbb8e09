"""``atso-fast bench``: the command line (options -> :class:`~atso_fast.bench.runner.BenchConfig`,
the report as a table or JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from atso_fast.bench.networks import default_window
from atso_fast.bench.runner import _PRECISIONS, BENCH_RUNTIMES, BenchConfig, run_bench
from atso_fast.cli.common import make_parser, parse_or_status
from atso_fast.engine.agreement import RECORD_KEY, agreement_table
from atso_fast.engine.windows import check_overlap
from atso_fast.package import load_package
from atso_fast.runtimes.base import check_device

__all__ = ["build_parser", "config_from_args", "format_table", "cli_main"]


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``atso-fast bench``."""
    p = make_parser(
        "atso-fast bench",
        (
            "Seconds per volume, voxels/s, windows/s, peak memory, stitching overhead over the network "
            "alone, and label agreement with the float32 reference, per runtime and precision."
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
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="built-in model only: window (default 64^3 on cpu, 96^3 on cuda)",
    )
    p.add_argument("--runtimes", default="all", help="'all' or a comma list of " + ",".join(BENCH_RUNTIMES))
    p.add_argument(
        "--precision",
        default=None,
        help="comma list of float32,float16,bfloat16 or 'all' (default float32 on cpu, float32,float16 on cuda)",
    )
    p.add_argument("--batch-size", "--batch", dest="batch", type=int, default=4, help="windows per runtime call")
    p.add_argument("--overlap", type=float, default=0.5, help="window overlap in [0, 1)")
    p.add_argument("--classes", type=int, help="built-in model only: output classes (default 3)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per pair (median reported)")
    p.add_argument(
        "--net",
        default="auto",
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

    device = check_device(args.device)
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
        _csv(args.runtimes, BENCH_RUNTIMES, "--runtimes"),
        precisions,
        batch,
        float(args.overlap),
        classes,
        device,
        repeats,
        args.net,
        int(args.seed),
        bool(args.compile),
    )


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


def cli_main(argv: list[str] | None = None) -> int:
    """``atso-fast bench [MODEL_DIR] [options]``: 0 when every pair that ran is correct, 1 when
    one is incorrect or failed, 2 on bad usage or a model package that cannot be loaded."""
    args = parse_or_status(build_parser(), argv)
    if isinstance(args, int):
        return args
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
