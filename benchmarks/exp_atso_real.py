"""ATSO vs self-training vs supervised on a real abdominal CT, as 2D axial slices.

Data: ``../shared/data/real/ct_abdomen`` (TotalSegmentator's example CT, 3 mm, 112 slices, labels
from that model). A handful of structures that span many slices are kept (liver, kidneys, colon,
small bowel, iliopsoas); everything else is background. The slices are cut into contiguous
blocks along z: the labelled set is one block, a neighbouring block is the held-out test set,
and every other slice is unlabelled. The three methods start from one shared warm-up per seed
(paired comparison). Skips with a message (exit 0) when the data folder is absent.

This is one scan: a proof that the trainer runs on real scanner data (int32 HU, odd sizes, real
anatomy), not a clinical benchmark.

Usage: python benchmarks/exp_atso_real.py [--seeds 0 1 2] [--block 16] [--labelled-block 4]
       [--test-block 5] [--threshold T] [--quick] [--threads N] [--data DIR] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exp_atso_synthetic import METHODS, machine_meta, markdown, summarise_run  # noqa: E402

from atso_fast.train.atso import ATSOConfig, run_methods  # noqa: E402
from atso_fast.train.data import data_from_arrays  # noqa: E402

__all__ = ["main", "CLASSES", "SETTING"]

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "ct_abdomen"
# new label: (name, TotalSegmentator labels merged into it)
CLASSES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("liver", (5,)), ("kidneys", (2, 3)), ("colon", (20,)), ("small_bowel", (18,)), ("iliopsoas", (88, 89)))
SETTING: dict[str, Any] = {"patch_size": (64, 64), "batch_size": 8, "model": {"base_channels": 8, "depth": 4},
                           "warmup_steps": 400, "rounds": 4, "steps_per_round": 100, "lr": 3e-3, "round_lr": 1e-3}
QUICK = {"warmup_steps": 10, "rounds": 2, "steps_per_round": 3}


def load_slices(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(Z, Y, X)`` image and remapped labels (0 = background, 1..K = :data:`CLASSES`)."""
    from atso_fast.io import read_volume

    image, _ = read_volume(folder / "image.nii.gz")
    raw, _ = read_volume(folder / "label.nii.gz")
    label = np.zeros(raw.shape, np.uint8)
    for new, (_, olds) in enumerate(CLASSES, start=1):
        label[np.isin(raw, olds)] = new
    return image, label


def split_blocks(depth: int, block: int, labelled_block: int, test_block: int
                 ) -> tuple[list[int], list[int], list[int]]:
    """Slice indices of the labelled block, the unlabelled rest and the test block.

    Raises:
        ValueError: blocks out of range or equal.
    """
    n_blocks = -(-depth // block)
    if block < 1 or not (0 <= labelled_block < n_blocks and 0 <= test_block < n_blocks) \
            or labelled_block == test_block:
        raise ValueError(f"need distinct blocks in [0, {n_blocks}) of {block} slices, "
                         f"got labelled {labelled_block}, test {test_block}")
    blocks = [list(range(b * block, min((b + 1) * block, depth))) for b in range(n_blocks)]
    unlabelled = [z for b, zs in enumerate(blocks) if b not in (labelled_block, test_block) for z in zs]
    return blocks[labelled_block], unlabelled, blocks[test_block]


def make_data(image: np.ndarray, label: np.ndarray, args: argparse.Namespace):
    """Depth-1 slices ``(1, Y, X)`` as labelled / unlabelled (truth kept for the monitor) / test."""
    lab, unl, test = split_blocks(image.shape[0], args.block, args.labelled_block, args.test_block)

    def pair(z: int) -> tuple[np.ndarray, np.ndarray]:
        return image[z:z + 1], label[z:z + 1]

    return data_from_arrays([pair(z) for z in lab], [pair(z) for z in unl], [pair(z) for z in test],
                            normalization="ct"), (lab, unl, test)


def run_seed(data: Any, setting: dict[str, Any], seed: int) -> dict[str, Any]:
    config = ATSOConfig(num_classes=len(CLASSES) + 1, spatial_dims=2, seed=seed, **setting)
    start = time.perf_counter()
    runs = run_methods(config, METHODS, data=data)
    out: dict[str, Any] = {m: summarise_run(r) for m, r in runs.items()}
    out["warmup"] = runs["atso"].history[0]["val_mean_dice"]
    out["seconds"] = time.perf_counter() - start
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--block", type=int, default=16, help="slices per block")
    parser.add_argument("--labelled-block", type=int, default=4)
    parser.add_argument("--test-block", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.0, help="pseudo-label confidence threshold")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the recorded results used 1; the count changes results)")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    folder = Path(args.data)
    if not (folder / "image.nii.gz").is_file() or not (folder / "label.nii.gz").is_file():
        print(f"exp_atso_real: skipped, no image.nii.gz/label.nii.gz in {folder} "
              "(see shared/data/real/README.md)", file=sys.stderr)
        return 0
    image, label = load_slices(folder)
    data, (lab, unl, test) = make_data(image, label, args)
    setting = {**SETTING, **(QUICK if args.quick else {}), "threshold": args.threshold}
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads or before)
    start = time.perf_counter()
    try:
        per_seed = []
        for seed in args.seeds:
            per_seed.append(run_seed(data, setting, seed))
            print(f"seed {seed}: " + ", ".join(f"{m} {per_seed[-1][m]['val_mean_dice']:.3f}" for m in METHODS),
                  file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(before)
    key = f"{len(lab)} labelled / {len(unl)} unlabelled slices"
    meta = {**machine_meta(args.threads or before, time.perf_counter() - start, args.seeds),
            "slices": {"labelled": lab, "unlabelled": unl, "test": test},
            "setting": {**setting, "patch_size": list(setting["patch_size"])}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "atso_real_ct" + (f"_t{args.threshold:g}" if args.threshold else "") + ("_quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": {key: per_seed}}, indent=1))
    title = (f"ATSO on real CT slices (ct_abdomen, test = slices {test[0]}-{test[-1]}, "
             f"labelled = slices {lab[0]}-{lab[-1]}, pseudo-label threshold {args.threshold:g})")
    text = markdown({key: per_seed}, meta, [name for name, _ in CLASSES], title)
    (out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
