"""The out-of-core input pipeline: patches cut from memory-mapped cases, batched by a torch
``DataLoader`` in worker processes.

Nothing per case stays in memory: a sample opens the case's ``.npy`` files with
``np.load(mmap_mode="r")``, copies the patch out and lets the mapping go, so memory does not
grow with the archive. Foreground oversampling reads the case's cached locations
(:mod:`atso_fast.train.cache`) the same way.

Reproducibility does not depend on the number of workers: batch ``s`` of round ``k`` is drawn
from its own generator seeded by ``(seed, k, purpose, s)``, so 0, 1 or 8 workers give the same
batches in the same order (the ``DataLoader`` keeps the order of its sampler), and a resumed run
can start at any step. ``worker_init_fn`` also seeds torch and NumPy's global generators per
worker from ``(seed, k, worker id)``, for any library code that draws from them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atso_fast.train.data import crop_with_padding, low_confidence
from atso_fast.train.trainer import MixedBatches

__all__ = ["DiskCase", "DiskSampler", "BatchDataset", "make_loader", "open_array"]


def open_array(path: Path) -> np.ndarray:
    """A read-only memory map of an ``.npy`` file (no pickles)."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


@dataclass
class DiskCase:
    """One training case on disk.

    ``image`` ``(M, Z, Y, X)`` float32 ``.npy``; ``label`` ``(Z, Y, X)`` uint8 ``.npy``;
    ``confidence`` (optional) uint8 ``.npy`` of the same shape; ``fg`` int64 flat indices of the
    foreground voxels, ``fg_counts[c]`` of them for class ``c`` (classes in increasing order).
    """

    image: Path
    label: Path
    shape: tuple[int, int, int]
    fg: Path | None = None
    fg_counts: dict[int, int] = field(default_factory=dict)
    confidence: Path | None = None


class DiskSampler:
    """:class:`~atso_fast.train.data.PatchSampler` over cases on disk (same draws, same patches).

    Args:
        cases: the cases.
        patch_size: ``(pz, py, px)``, or ``(py, px)`` for 2D slices.
        foreground_oversample: probability of a foreground-centred patch.
        ignore_index: label of ignored voxels and padding.
        threshold: voxels whose confidence is below ``threshold * 255`` (one value, or one per
            class: :func:`~atso_fast.train.data.low_confidence`) get ``ignore_index`` (cases with a
            ``confidence`` file only).

    Raises:
        ValueError: no case, bad patch size or probability.
    """

    def __init__(self, cases: Sequence[DiskCase], patch_size: Sequence[int], *, foreground_oversample: float = 0.33,
                 ignore_index: int = 255, threshold: float | Sequence[float] = 0.0) -> None:
        if not cases:
            raise ValueError("DiskSampler needs at least one case, got 0")
        if len(patch_size) not in (2, 3) or min(patch_size) < 1:
            raise ValueError(f"patch_size must be 2 or 3 positive ints, got {tuple(patch_size)}")
        if not 0.0 <= foreground_oversample <= 1.0:
            raise ValueError(f"foreground_oversample must be in [0, 1], got {foreground_oversample}")
        self.cases = list(cases)
        self.flat = len(patch_size) == 2
        self.patch = (1, *patch_size) if self.flat else tuple(int(p) for p in patch_size)
        self.p_fg, self.ignore_index = float(foreground_oversample), int(ignore_index)
        self.threshold = list(threshold) if isinstance(threshold, (list, tuple)) else float(threshold)
        # per case: [(class, offset, count)] of the classes present, in increasing class order
        self._locs = [self._offsets(c.fg_counts) for c in self.cases]

    @staticmethod
    def _offsets(counts: dict[int, int]) -> list[tuple[int, int, int]]:
        out, offset = [], 0
        for cls in sorted(counts):
            if counts[cls] > 0:
                out.append((cls, offset, counts[cls]))
            offset += counts[cls]
        return out

    def _origin(self, index: int, rng: np.random.Generator) -> list[int]:
        case, locs = self.cases[index], self._locs[index]
        shape = case.shape
        lows = [min(0, n - p) for n, p in zip(shape, self.patch)]
        highs = [max(0, n - p) for n, p in zip(shape, self.patch)]
        if locs and rng.random() < self.p_fg:
            _, offset, count = locs[int(rng.integers(len(locs)))]
            flat = int(open_array(case.fg)[offset + int(rng.integers(count))])
            center = np.unravel_index(flat, shape)
            return [int(np.clip(c - p // 2, lo, hi)) for c, p, lo, hi in zip(center, self.patch, lows, highs)]
        return [int(rng.integers(lo, hi + 1)) for lo, hi in zip(lows, highs)]

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One ``(image (M, *patch), label (*patch))`` pair; ``rng`` is the only randomness."""
        index = int(rng.integers(len(self.cases)))
        case = self.cases[index]
        origin = self._origin(index, rng)
        image = crop_with_padding(open_array(case.image), origin, self.patch, 0.0)
        label = crop_with_padding(open_array(case.label), origin, self.patch, self.ignore_index)
        if case.confidence is not None and self.threshold != 0.0:
            conf = crop_with_padding(open_array(case.confidence), origin, self.patch, 255)
            label[low_confidence(label, conf, self.threshold)] = self.ignore_index
        if self.flat:
            return image[:, 0], label[0]
        return image, label


class BatchDataset(torch.utils.data.Dataset):
    """Batch ``s`` (``0 <= s < steps``) of a round: ``(x (B, M, *patch) float32, y (B, *patch)
    int64, labelled count)``, drawn by ``batches`` from a generator seeded by ``(*key, s)``."""

    def __init__(self, batches: MixedBatches, key: Sequence[int], steps: int) -> None:
        self.batches, self.key, self.steps = batches, [int(k) for k in key], int(steps)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        rng = np.random.default_rng([*self.key, int(step)])
        x, y = self.batches(rng)
        return torch.from_numpy(x), torch.from_numpy(y), int(self.batches.last_labelled)


class _WorkerInit:
    """Seeds a worker's global generators from ``(seed, round, worker id)``; one torch thread
    per worker (the workers only cut patches; the training process keeps the cores)."""

    def __init__(self, seed: int, k: int) -> None:
        self.seed, self.k = int(seed), int(k)

    def __call__(self, worker_id: int) -> None:
        ss = np.random.SeedSequence([self.seed, self.k, int(worker_id)])
        torch.manual_seed(int(ss.generate_state(1, np.uint64)[0]) & (2 ** 63 - 1))
        np.random.seed(int(ss.generate_state(1)[0]))
        torch.set_num_threads(1)


def make_loader(dataset: BatchDataset, *, start: int = 0, workers: int = 0, device: str = "cpu",
                seed: int = 0, k: int = 0, prefetch: int = 2) -> Any:
    """A ``DataLoader`` over steps ``start .. len(dataset) - 1`` in order.

    Args:
        workers: worker processes (0: batches are cut in this process).
        device: pinned memory when it is CUDA.
        seed, k: seed the workers' global generators.
        prefetch: batches each worker keeps ready.
    """
    if int(workers) < 0:
        raise ValueError(f"loader workers must be >= 0, got {workers}")
    kwargs: dict[str, Any] = {}
    if workers:
        kwargs = {"worker_init_fn": _WorkerInit(seed, k), "prefetch_factor": int(prefetch)}
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(int(start), len(dataset)),
                                       num_workers=int(workers), pin_memory=str(device).startswith("cuda"),
                                       **kwargs)
