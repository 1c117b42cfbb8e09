"""The out-of-core input pipeline: batches of patches cut from memory-mapped cases (a
:class:`~atso_fast.train.data.PatchSampler` over ``.npy`` files, :meth:`~atso_fast.train.data.PatchSampler.from_cases`),
drawn by a torch ``DataLoader`` in worker processes.

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
from typing import Any

import numpy as np
import torch

from atso_fast.train.trainer import MixedBatches

__all__ = ["BatchDataset", "make_loader"]


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
        torch.manual_seed(int(ss.generate_state(1, np.uint64)[0]) & (2**63 - 1))
        np.random.seed(int(ss.generate_state(1)[0]))
        torch.set_num_threads(1)


def make_loader(
    dataset: BatchDataset,
    *,
    start: int = 0,
    workers: int = 0,
    device: str = "cpu",
    seed: int = 0,
    k: int = 0,
    prefetch: int = 2,
) -> Any:
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
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=range(int(start), len(dataset)),
        num_workers=int(workers),
        pin_memory=str(device).startswith("cuda"),
        **kwargs,
    )
