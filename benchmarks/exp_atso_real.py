"""ATSO vs self-training vs supervised vs oracle on real scans, with an interleaved, seeded split
(protocol: ``exp_atso_protocol.py``; split: ``atso_fast.datasets.splits.interleaved_split``).

Datasets (``../shared/data/real``, read-only, never copied; labels are TotalSegmentator's output):
    ``ct``  ``ct_abdomen`` (3 mm, 112 axial slices): liver, kidneys, colon, small bowel, iliopsoas.
            2D: axial slices in 7 bands of 16; per band a held-out block (guard, 2 test, guard,
            1 validation, guard, in random order and place) and 2 labelled slices; the rest is
            unlabelled: 14 labelled, 56 unlabelled, 7 validation, 14 test slices per seed.
            3D: slabs of 8 slices with a 1-slice gap between slabs (a guard); per seed the 12 slabs
            go, band by band (3 bands of 4 slabs), to test (1 per band), labelled (1 per band) and
            unlabelled, with one unlabelled slab moved to validation.
    ``mr``  ``mr_abdomen`` (3 mm, 20 axial slices, so coronal slices, 91 of 20 x 117):
            liver, spleen, kidneys, stomach, autochthon muscles; 7 bands of 13 coronal slices,
            1 labelled per band: 7 labelled, 42 unlabelled, 7 validation, 14 test slices.
Every arm of a seed starts from one warm-up (paired). Skips with a message (exit 0) when the data
folder is absent. One scan per dataset: a check that the method behaves on real anatomy and
intensities, not a clinical benchmark.

Usage: python benchmarks/exp_atso_real.py [--dataset ct|mr] [--dims 2|3] [--seeds 0 1 2 3 4]
       [--arms main|all] [--workers 2] [--warmup-steps N] [--quick] [--data DIR] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exp_atso_protocol import (  # noqa: E402,I001
    ARMS,
    charts,
    choose_warmup,
    cpu_seconds,
    machine_meta,
    markdown,
    run_seed,
    run_seeds,
    summarise,
    warmup_sweep,
)
from exp_atso_synthetic import VARIANTS, chosen_on_validation, contrasts_for  # noqa: E402

from atso_fast.datasets.splits import interleaved_split  # noqa: E402
from atso_fast.train.atso import ATSOConfig  # noqa: E402
from atso_fast.train.data import data_from_arrays  # noqa: E402

__all__ = ["DATASETS", "main", "load_volume", "make_split", "seed_task", "pilot_task"]

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
_TRAIN_2D = {
    "batch_size": 8,
    "model": {"base_channels": 8, "depth": 4},
    "warmup_steps": 1000,
    "rounds": 4,
    "steps_per_round": 200,
    "lr": 3e-3,
    "round_lr": 1e-3,
}
DATASETS: dict[str, dict[str, Any]] = {
    "ct": {
        "folder": "ct_abdomen",
        "normalization": "ct",
        "axis": 0,
        # new label: (name, TotalSegmentator labels merged into it)
        "classes": (
            ("liver", (5,)),
            ("kidneys", (2, 3)),
            ("colon", (20,)),
            ("small_bowel", (18,)),
            ("iliopsoas", (88, 89)),
        ),
        "split": {"bands": 7, "test_chunk": 2, "val_chunk": 1, "labelled_per_band": 2},
        "train": {**_TRAIN_2D, "patch_size": (64, 64)},
        "train3d": {
            "batch_size": 2,
            "model": {"base_channels": 8, "depth": 3},
            "warmup_steps": 600,
            "rounds": 4,
            "steps_per_round": 150,
            "lr": 3e-3,
            "round_lr": 1e-3,
            "patch_size": (8, 48, 48),
        },
    },
    "mr": {
        "folder": "mr_abdomen",
        "normalization": "zscore",
        "axis": 1,
        "classes": (
            ("liver", (5,)),
            ("spleen", (1,)),
            ("kidneys", (2, 3)),
            ("stomach", (6,)),
            ("autochthon", (46, 47)),
        ),
        "split": {"bands": 7, "test_chunk": 2, "val_chunk": 1, "labelled_per_band": 1},
        "train": {**_TRAIN_2D, "patch_size": (16, 64)},
    },
}
QUICK = {"warmup_steps": 10, "rounds": 2, "steps_per_round": 3}


def load_volume(folder: Path, classes: tuple[tuple[str, tuple[int, ...]], ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(Z, Y, X)`` image and labels remapped to 0 = background, 1..K = ``classes``."""
    from atso_fast.io import read_volume

    image, _ = read_volume(folder / "image.nii.gz")
    raw, _ = read_volume(folder / "label.nii.gz")
    label = np.zeros(raw.shape, np.uint8)
    for new, (_, olds) in enumerate(classes, start=1):
        label[np.isin(raw, olds)] = new
    return image, label


def _slices(image: np.ndarray, label: np.ndarray, axis: int, idx: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """2D cases ``(1, H, W)`` taken along ``axis`` (0 axial, 1 coronal)."""
    return [
        (
            np.take(image, [i], axis=axis).swapaxes(0, axis) if axis else image[i : i + 1],
            np.take(label, [i], axis=axis).swapaxes(0, axis) if axis else label[i : i + 1],
        )
        for i in idx
    ]


def slab_split(depth: int, seed: int, *, slab: int = 8, gap: int = 1, bands: int = 3) -> dict[str, list[list[int]]]:
    """3D: slabs of ``slab`` slices separated by ``gap`` guard slices (random start offset), dealt
    band by band: per band 1 test and 1 labelled slab, the rest unlabelled; one unlabelled slab
    (from a random band) becomes validation."""
    rng = np.random.default_rng([int(seed), 23])
    count = (depth + gap) // (slab + gap)
    offset = int(rng.integers(depth - (count * (slab + gap) - gap) + 1))
    slabs = [list(range(offset + s * (slab + gap), offset + s * (slab + gap) + slab)) for s in range(count)]
    out: dict[str, list[list[int]]] = {"labelled": [], "unlabelled": [], "val": [], "test": []}
    for band in np.array_split(np.arange(count), bands):
        order = rng.permutation(band).tolist()
        out["test"].append(slabs[order[0]])
        out["labelled"].append(slabs[order[1]])
        out["unlabelled"] += [slabs[i] for i in order[2:]]
    out["val"].append(out["unlabelled"].pop(int(rng.integers(len(out["unlabelled"])))))
    return out


def make_split(spec: dict[str, Any], image: np.ndarray, label: np.ndarray, seed: int, dims: int):
    """``(data, test cases, split)`` of one seed."""
    if dims == 3:
        split = slab_split(image.shape[0], seed)
        cases = {k: [(image[z[0] : z[-1] + 1], label[z[0] : z[-1] + 1]) for z in v] for k, v in split.items()}
    else:
        split = interleaved_split(image.shape[spec["axis"]], seed=seed, **spec["split"])
        cases = {k: _slices(image, label, spec["axis"], v) for k, v in split.items() if k != "guard"}
    data = data_from_arrays(
        cases["labelled"], cases["unlabelled"], cases["val"] + cases["test"], normalization=spec["normalization"]
    )
    test = data.val[len(cases["val"]) :]
    data.val = data.val[: len(cases["val"])]
    return data, test, split


def seed_task(
    spec: dict[str, Any], folder: str, dims: int, train: dict[str, Any], arms: dict[str, dict[str, Any]], seed: int
) -> dict[str, Any]:
    """One seed (module level: runs in spawn workers)."""
    image, label = load_volume(Path(folder), spec["classes"])
    data, test, split = make_split(spec, image, label, seed, dims)
    config = ATSOConfig(num_classes=len(spec["classes"]) + 1, spatial_dims=dims, seed=seed, **train)
    out = run_seed(config, data, test, arms)
    out["split"] = split
    return out


def pilot_task(
    spec: dict[str, Any], folder: str, dims: int, train: dict[str, Any], grid: list[int], seed: int
) -> dict[str, Any]:
    """Warm-up length sweep on a pilot seed's split (validation slices only)."""
    image, label = load_volume(Path(folder), spec["classes"])
    data, _, _ = make_split(spec, image, label, seed, dims)
    config = ATSOConfig(num_classes=len(spec["classes"]) + 1, spatial_dims=dims, seed=seed, **train)
    return warmup_sweep(config, data, grid)


def _pilot(
    args: argparse.Namespace, spec: dict[str, Any], folder: Path, train: dict[str, Any], stem: str, meta: dict[str, Any]
) -> int:
    start = time.perf_counter()
    task = functools.partial(pilot_task, spec, str(folder), args.dims, train, args.grid)
    pilot = run_seeds(
        task,
        args.pilot_seeds,
        Path(args.work or f"/tmp/atso_exp/{stem}_pilot"),
        workers=args.workers,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    chosen, means = choose_warmup(pilot)
    meta.update(
        seconds=time.perf_counter() - start,
        cpu_seconds=cpu_seconds(pilot),
        load_after=[round(x, 2) for x in os.getloadavg()],
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}_pilot.json").write_text(
        json.dumps(
            {"meta": meta, "means": means, "chosen": chosen, "seeds": {str(k): v for k, v in pilot.items()}}, indent=1
        )
    )
    lines = [
        f"# Warm-up pilot, real {args.dataset.upper()} {args.dims}D (validation slices, seeds {args.pilot_seeds})",
        "",
        f"{meta['machine']}; {meta['date']}; wall {meta['seconds'] / 60:.1f} min, "
        f"{meta['cpu_seconds'] / 60:.1f} CPU-min.",
        "",
        "| warm-up steps | " + " | ".join(map(str, means)) + " |",
        "|---|" + "---|" * len(means),
        "| val mean Dice of M0 | " + " | ".join(f"{v:.3f}" for v in means.values()) + " |",
        "",
        f"Chosen (shortest within 0.005 of the best): **{chosen}** steps.",
    ]
    (out / f"{stem}_pilot.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=list(DATASETS), default="ct")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", choices=("main", "all"), default="main")
    parser.add_argument("--extra-arms", nargs="*", default=[], help=f"variants to add, from {list(VARIANTS)}")
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--pilot", action="store_true", help="only the warm-up length sweep on --pilot-seeds")
    parser.add_argument("--pilot-seeds", type=int, nargs="+", default=[100, 101])
    parser.add_argument("--grid", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work")
    parser.add_argument("--stem", help="output file stem (default atso_real_<dataset>_<dims>d[...])")
    args = parser.parse_args(argv)
    spec = DATASETS[args.dataset]
    folder = Path(args.data) / spec["folder"]
    if not (folder / "image.nii.gz").is_file() or not (folder / "label.nii.gz").is_file():
        print(
            f"exp_atso_real: skipped, no image.nii.gz/label.nii.gz in {folder} (see shared/data/real/README.md)",
            file=sys.stderr,
        )
        return 0
    if args.dims == 3 and "train3d" not in spec:
        raise SystemExit(f"exp_atso_real: no 3D setting for dataset {args.dataset!r}")
    train = dict(spec["train3d" if args.dims == 3 else "train"])
    train.update(QUICK if args.quick else {})
    if args.warmup_steps is not None:
        train["warmup_steps"] = args.warmup_steps
    arms = {**ARMS, **VARIANTS} if args.arms == "all" else {**ARMS, **{a: VARIANTS[a] for a in args.extra_arms}}
    stem = (
        (
            f"atso_real_{args.dataset}_{args.dims}d"
            + ("_all" if args.arms == "all" else "")
            + ("_quick" if args.quick else "")
        )
        if args.stem is None
        else args.stem
    )
    meta = machine_meta(args.workers)
    if args.pilot:
        return _pilot(args, spec, folder, train, stem, meta)
    start = time.perf_counter()
    task = functools.partial(seed_task, spec, str(folder), args.dims, train, arms)
    results = run_seeds(
        task,
        args.seeds,
        Path(args.work or f"/tmp/atso_exp/{stem}"),
        workers=args.workers,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    meta.update(
        seconds=time.perf_counter() - start,
        cpu_seconds=cpu_seconds(results),
        load_after=[round(x, 2) for x in os.getloadavg()],
        train={**train, "patch_size": list(train["patch_size"])},
        dataset=args.dataset,
        dims=args.dims,
        arms=arms,
        split_sizes={k: len(v) for k, v in next(iter(results.values()))["split"].items()},
        contrasts=contrasts_for(arms),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(results, meta["contrasts"])
    (out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "results": {str(k): v for k, v in results.items()}}, indent=1)
    )
    title = (
        f"ATSO on real {args.dataset.upper()} ({spec['folder']}, {args.dims}D, interleaved split, {len(results)} seeds)"
    )
    png = charts(results, out / f"{stem}_monitors.png", title)
    notes = [
        f"Charts: `{png.name}`. Split sizes per seed: {meta['split_sizes']} "
        f"({'slabs' if args.dims == 3 else 'slices'}); training: {json.dumps(meta['train'])}.",
        "",
        *chosen_on_validation(summary),
    ]
    text = markdown(results, meta, [name for name, _ in spec["classes"]], meta["contrasts"], title, notes)
    (out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
