"""``atso-fast train`` and ``atso-fast demo``.

``atso-fast train CONFIG.yaml [--resume] [--out DIR]`` runs ATSO (or a baseline, per the config's
``method``) and exports the final model as a package (``OUT/model``) for ``atso-fast relabel``.
On driving scenes (the Cityscapes data form, e.g. with ``model: {name: resnet_unet, layers: 18,
encoder_weights: resnet18.pth}``) it also prints the validation mIoU, and the package (2D, RGB,
ImageNet normalisation, Cityscapes class names) relabels a split to label PNGs
(``atso-fast relabel OUT/model ROOT/leftImg8bit/val LABELS``).

``atso-fast demo [--out DIR] [--seed S] [--quick]`` needs no download and no GPU: it writes a small
synthetic CT archive, runs supervised, self-training and ATSO from one shared warm-up, exports the
ATSO model, relabels the unlabelled archive with the relabel engine and prints a table.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from atso_fast.cliargs import make_parser
from atso_fast.datasets.synthetic import make_archive, phantom_class_names
from atso_fast.engine.relabeler import Relabeler
from atso_fast.io.files import read_text_file
from atso_fast.package import export_model
from atso_fast.runtimes.torch_rt import torch_threads
from atso_fast.train.atso import ATSO, resolve_storage, run_methods
from atso_fast.train.data import parse_listing_text
from atso_fast.train.report import demo_report
from atso_fast.train.scene_data import is_scene_spec

__all__ = [
    "train_main",
    "demo_main",
    "build_train_parser",
    "build_demo_parser",
    "load_config",
    "format_history",
    "format_iou",
    "export_package",
    "DEMO_SETTINGS",
    "DEMO_METHODS",
    "METHODS_LEGEND",
    "ROUNDS_LEGEND",
]


# Demo sizes: CPU-friendly 3D phantoms. "full" took 84 s with one torch thread on a 2-core CPU shared
# with other jobs (load ~3.5), and 54 s with two threads when idle, but 740 s with two threads under
# the same load (OpenMP threads wait for each other when a core is taken): hence --threads 1 by default.
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "full": {
        "n": 24,
        "num_labelled": 4,
        "num_val": 6,
        "shape": [16, 32, 32],
        "warmup_steps": 400,
        "rounds": 2,
        "steps_per_round": 80,
    },
    "quick": {
        "n": 6,
        "num_labelled": 2,
        "num_val": 2,
        "shape": [16, 32, 32],
        "warmup_steps": 10,
        "rounds": 2,
        "steps_per_round": 4,
    },
}


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the command, then restore it."""

    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    with torch_threads(threads):
        yield


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for chatty in ("onnx_ir", "onnxscript", "torch.onnx"):  # the exporter's pass-by-pass notes, every round
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))


def load_config(path: str | Path, *, out: str | Path | None = None) -> dict[str, Any]:
    """Read a YAML/JSON config; ``data`` (a path, or the folders of the Cityscapes data form:
    ``cityscapes``, ``unlabelled_root``, ``val_root``), ``model.encoder_weights`` and ``out_dir``
    are resolved relative to the file.

    Args:
        path: the config file.
        out: overrides ``out_dir``.

    Raises:
        ValueError: unreadable file, not a mapping, or no output folder.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise ValueError(f"config file {path} not found")
    config = parse_listing_text(read_text_file(path), path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of ATSOConfig fields, got {type(config).__name__}")
    if isinstance(config.get("data"), str):
        config["data"] = str(path.parent / config["data"])
    _resolve_paths(config, path.parent)
    if out is not None:
        config["out_dir"] = str(out)
    elif config.get("out_dir"):
        config["out_dir"] = str(path.parent / config["out_dir"])
    else:
        raise ValueError(f"{path}: no output folder; set out_dir or pass --out")
    return config


def _resolve_paths(config: dict[str, Any], folder: Path) -> None:
    """The Cityscapes form's folders and the encoder weights, relative to the config's ``folder``."""
    data, model = config.get("data"), config.get("model")
    if isinstance(data, dict) and is_scene_spec(data):
        config["data"] = {
            **data,
            **{
                k: str(folder / data[k])
                for k in ("cityscapes", "unlabelled_root", "val_root")
                if isinstance(data.get(k), str)
            },
        }
    if isinstance(model, dict) and isinstance(model.get("encoder_weights"), str):
        config["model"] = {**model, "encoder_weights": str(folder / model["encoder_weights"])}


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_history(history: list[dict[str, Any]]) -> str:
    """A plain-text table of the per-round metrics (schedule + lazy-learning monitor); runs that
    report IoU get a ``val mIoU`` column (pooled over the validation images)."""
    iou = any("val_miou" in m for m in history)
    rows = [
        (
            "round",
            "trained on",
            "labels by",
            "relabelled",
            "by",
            "loss",
            "pre-loss",
            "changed",
            "confidence",
            "val Dice",
        )
        + (("val mIoU",) if iou else ())
    ]
    for m in history:
        pre = [v.get("pre_loss") for v in m["monitor"].values() if v.get("pre_loss") is not None]
        changed = [v["changed_fraction"] for v in m["monitor"].values() if v.get("changed_fraction") is not None]
        conf = [v["mean_confidence"] for v in m["monitor"].values() if "mean_confidence" in v]
        by = ",".join(sorted({x for v in m["train_labels_from"].values() for x in v}))
        rows.append(
            (
                str(m["round"]),
                "+".join(m["trained_on"]),
                by or "-",
                "+".join(m["relabelled"]) or "-",
                m["relabelled_by"] or "-",
                _fmt(m["train"]["loss"]),
                _fmt(pre[0] if pre else None),
                _fmt(sum(changed) / len(changed) if changed else None, ".4f"),
                _fmt(sum(conf) / len(conf) if conf else None),
                _fmt(m["val_mean_dice"]),
            )
            + ((_fmt(m.get("val_miou")),) if iou else ())
        )
    return _table(rows)


def format_iou(metrics: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    """The final validation mIoU (pooled and per image) and IoU per class, of a metrics row that
    has them; ``""`` otherwise."""
    if "val_miou" not in metrics:
        return ""
    ious = metrics.get("val_iou") or []
    names = list(class_names) if class_names and len(class_names) == len(ious) else [str(i) for i in range(len(ious))]
    return (
        f"val mIoU {_fmt(metrics['val_miou'])} (pooled over the validation images), "
        f"{_fmt(metrics.get('val_miou_per_image'))} (mean per image)\nval IoU per class: "
        + ", ".join(f"{n} {_fmt(v)}" for n, v in zip(names, ious))
    )


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def export_package(atso: Any, folder: str | Path, class_names: list[str] | None = None) -> Path:
    """Export ``atso.model`` with the run's window, classes, normalisation, spacing and
    preprocessing spec to ``folder``."""

    cfg = atso.config
    return export_model(
        atso.model,
        folder,
        window=list(cfg.patch_size),
        num_classes=cfg.num_classes,
        kind="logits",
        normalization=cfg.normalization,
        in_channels=cfg.in_channels,
        spacing=cfg.spacing,
        class_names=class_names or cfg.class_names,
        preprocessing=cfg.preprocessing,
    )


def build_train_parser() -> argparse.ArgumentParser:
    """Argument parser of ``atso-fast train``."""
    parser = make_parser("atso-fast train", "Run ATSO (or a baseline) from a YAML/JSON config of ATSOConfig fields.")
    parser.add_argument("config", help="YAML or JSON file")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (default: off)")
    parser.add_argument("-o", "--out", "--output", dest="out", help="output folder (default: the config's out_dir)")
    parser.add_argument("--no-export", action="store_true", help="skip exporting OUT/model (default: off)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="bulk relabel engine of each round on disk storage; ray takes its pool options "
        "(workers, address, ...) from the config's relabel dict (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        help="logging level; INFO shows per-round progress: steps, loss, relabel cases/s (default: %(default)s)",
    )
    return parser


def train_main(argv: list[str] | None = None, *, engines: dict[str, Any] | None = None) -> int:
    """``atso-fast train CONFIG [--resume] [--out DIR] [--no-export] [--engine local|ray]``;
    returns the exit code.

    Args:
        engines: archive engines by ``--engine`` name beside ``"local"`` (the command line layer
            passes the Ray engine, which this layer may not import).
    """
    args = build_train_parser().parse_args(argv)
    _setup_logging(args.log_level)

    try:
        config = load_config(args.config, out=args.out)
        engine = None
        if args.engine != "local":
            if resolve_storage(config) != "disk":
                raise ValueError(f"--engine {args.engine} relabels on disk storage; this config runs in memory")
            available = engines or {}
            if args.engine not in available:
                raise ValueError(f"--engine {args.engine} is not available here (run `atso-fast train`)")
            engine = available[args.engine]
        with _torch_threads(args.threads):
            atso = ATSO(config, archive_engine=engine)
            history = atso.run(resume=args.resume)
            package = None if args.no_export else export_package(atso, Path(config["out_dir"]) / "model")
    except ValueError as exc:
        print(f"atso-fast train: error: {exc}", file=sys.stderr)
        return 2
    print(format_history(history))
    iou = format_iou(history[-1], atso.config.class_names) if history else ""
    if iou:
        print(f"\n{iou}")
    print(
        f"\nmetrics: {Path(config['out_dir']) / 'metrics.jsonl'}" + (f"\nmodel package: {package}" if package else "")
    )
    return 0


def _demo_config(archive: dict[str, Any], settings: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    return {
        "data": archive["root"],
        "num_classes": archive["num_classes"],
        "patch_size": settings["shape"],
        "batch_size": 2,
        "model": {"base_channels": 8, "depth": 3},
        "normalization": "auto",
        "warmup_steps": settings["warmup_steps"],
        "rounds": settings["rounds"],
        "steps_per_round": settings["steps_per_round"],
        "lr": 1e-2,
        "round_lr": 3e-3,
        "seed": seed,
        "out_dir": str(out / "runs"),
        # on a terminal the demo's own bar reports; elsewhere the trainer's lines do
        "progress": not getattr(sys.stderr, "isatty", lambda: False)(),
    }


def _relabel_archive(atso: Any, archive_root: str, out: Path, class_names: list[str]) -> dict[str, Any]:
    """Export the model and relabel ``imagesUn`` through the relabel engine (model package)."""

    start = time.perf_counter()
    package = export_package(atso, out / "model", class_names)
    export_s = time.perf_counter() - start
    engine = Relabeler(package, runtime="auto", overlap=0.5, batch_size=4)
    # a rerun of the demo in the same folder redoes the relabelling (the model is new)
    summary = engine.relabel_archive(
        Path(archive_root) / "imagesUn", out / "relabelled", overwrite=True, progress=False
    )
    summary.update(export_seconds=export_s, package=str(package))
    return summary


def _demo_table(runs: dict[str, Any], class_names: list[str], relabel: dict[str, Any]) -> str:
    rows = [("method", "val mean Dice", *class_names[1:], "train s")]
    for method, run in runs.items():
        last = run.history[-1]
        seconds = sum(h["seconds"] for h in run.history[1:])
        rows.append((method, _fmt(last["val_mean_dice"]), *(_fmt(d) for d in last["val_dice"][1:]), f"{seconds:.1f}"))
    text = _table(rows)
    text += (
        f"\n\nrelabel engine ({relabel['runtime']}): {relabel['done']}/{relabel['total']} unlabelled volumes "
        f"in {relabel['seconds']:.2f} s = {relabel['cases_per_s']:.1f} volumes/s, "
        f"{relabel['voxels_per_s'] / 1e6:.2f} Mvox/s (export {relabel['export_seconds']:.1f} s)"
    )
    return text


DEMO_METHODS = ("supervised", "self-training", "atso")

METHODS_LEGEND = """\
What the columns mean:
  val mean Dice  overlap of the predicted and the true labels on the validation phantoms, averaged over the
                 organ classes: 0 is no overlap, 1 a perfect match
  liver ...      the same Dice for each class on its own
  train s        seconds of training after the warm-up all three methods share
Methods: supervised trains on the labelled phantoms only; self-training also trains on pseudo labels of
all unlabelled phantoms made by the model itself; atso splits the unlabelled phantoms in two halves and
labels each half with the model trained on the other, so a model never relabels the half it just learnt.
relabel engine: the exported ATSO model labelling the unlabelled phantoms as `atso-fast relabel` does;
volumes/s and Mvox/s (million voxels per second) are its speed, export the seconds to write the package."""

ROUNDS_LEGEND = """\
What the columns mean:
  round       0 is the warm-up model M0 (labelled phantoms only); each later round trains once more
  trained on  data of the round: L = labelled phantoms, U1 and U2 = the halves of the unlabelled ones
  labels by   the model whose pseudo labels the round trained on (M0 = warm-up, M1 = after round 1, ...)
  relabelled  the half that got new pseudo labels after the round, and by (the next column) which model
  loss        training loss at the end of the round (lower is better)
  pre-loss    loss of the model entering the round on the pseudo labels it is about to train on,
              measured before training (the lazy-learning monitor: how much is left to learn there)
  changed     fraction of pseudo-label voxels that changed when the half was relabelled
  confidence  the model's highest class probability, averaged over the voxels it relabelled (0 to 1)
  val Dice    mean Dice on the validation phantoms after the round"""


class _DemoProgress:
    """Training progress of the demo on stderr: a bar whose clock ticks every second on a terminal,
    one line per finished stage otherwise. It is the runs' callback (after the warm-up and after
    every round)."""

    def __init__(self, settings: dict[str, Any], methods: Sequence[str], stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        rounds = range(1, settings["rounds"] + 1)
        self.stages = [("warm-up M0 (labelled phantoms only)", settings["warmup_steps"])]
        self.stages += [(f"{m} round {r}", settings["steps_per_round"]) for m in methods for r in rounds]
        self.index, self.steps_done = 0, 0
        self.total = sum(steps for _, steps in self.stages)
        self.bar, self._stop = None, threading.Event()
        if bool(getattr(self.stream, "isatty", lambda: False)()):
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                desc=f"training: {self.stages[0][0]}",
                smoothing=0.3,
            )
            threading.Thread(target=self._tick, args=(self.bar,), daemon=True, name="atso-demo-progress").start()
        else:
            print(
                f"atso-fast demo: training {len(self.stages)} stages, {self.total} steps (first: {self.stages[0][0]})",
                file=self.stream,
                flush=True,
            )

    def _tick(self, bar: Any) -> None:
        while not self._stop.wait(1.0):
            bar.refresh()

    def __call__(self, atso: Any, metrics: dict[str, Any]) -> None:
        name, steps = self.stages[min(self.index, len(self.stages) - 1)]
        self.index += 1
        self.steps_done += steps
        line = f"{name}: val mean Dice {_fmt(metrics.get('val_mean_dice'))}, {metrics.get('seconds', 0):.1f} s"
        if self.bar is None:
            print(f"atso-fast demo: [{self.steps_done}/{self.total} steps] {line}", file=self.stream, flush=True)
            return
        self.bar.write(f"  {line}", file=self.stream)
        if self.index < len(self.stages):
            self.bar.set_description(f"training: {self.stages[self.index][0]}", refresh=False)
        self.bar.update(steps)

    def close(self) -> None:
        self._stop.set()
        if self.bar is not None:
            self.bar.close()


def _run_demo(settings: dict[str, Any], seed: int, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:

    archive = make_archive(
        out / "archive",
        settings["n"],
        num_labelled=settings["num_labelled"],
        num_val=settings["num_val"],
        shape=settings["shape"],
        seed=seed,
        target_radius=(0.14, 0.22),
    )
    progress = _DemoProgress(settings, DEMO_METHODS)
    try:
        runs = run_methods(_demo_config(archive, settings, seed, out), DEMO_METHODS, callbacks=[progress])
    finally:
        progress.close()
    print(
        "atso-fast demo: exporting the ATSO model and relabelling the unlabelled phantoms", file=sys.stderr, flush=True
    )
    relabel = _relabel_archive(runs["atso"], archive["root"], out, phantom_class_names())
    return runs, relabel


def build_demo_parser() -> argparse.ArgumentParser:
    """Argument parser of ``atso-fast demo``."""
    parser = make_parser(
        "atso-fast demo",
        "Synthetic end-to-end ATSO demo on CPU: a phantom archive, three training methods, export, the relabel engine.",
    )
    parser.add_argument(
        "-o", "--out", "--output", dest="out", default="_demo_out", help="output folder (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data, split and training (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests, < 1 minute) (default: off)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: %(default)s: steady on shared machines; see DEMO_SETTINGS)",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: %(default)s)")
    return parser


def demo_main(argv: list[str] | None = None) -> int:
    """``atso-fast demo [--out DIR] [--seed S] [--quick]``; returns the exit code."""
    args = build_demo_parser().parse_args(argv)
    _setup_logging(args.log_level)
    start = time.perf_counter()
    settings = DEMO_SETTINGS["quick" if args.quick else "full"]
    out = Path(args.out)
    try:
        with _torch_threads(args.threads):
            runs, relabel = _run_demo(settings, args.seed, out)
    except ValueError as exc:
        print(f"atso-fast demo: error: {exc}", file=sys.stderr)
        return 2
    names = phantom_class_names()
    print(
        f"atso-fast demo: {settings['n'] - settings['num_labelled']} unlabelled + {settings['num_labelled']} "
        f"labelled 3D phantoms {tuple(settings['shape'])}, {settings['num_val']} validation; seed {args.seed}\n"
    )
    print(_demo_table(runs, names, relabel))
    print(f"\n{METHODS_LEGEND}")
    print("\n" + demo_report(runs))
    print(f"\nATSO rounds:\n{format_history(runs['atso'].history)}")
    print(f"\n{ROUNDS_LEGEND}")
    print(f"\ntotal {time.perf_counter() - start:.1f} s; outputs in {out}")
    return 1 if relabel["failed"] else 0
