"""Blending window outputs into a slab of rows, then finishing rows as soon as they are final.

MONAI's ``Merger`` idea (aggregate, then finalise), made streaming. Windows arrive in z order
(MONAI's z-major grid); the :class:`SlabMerger` keeps only ``min(pz, Z)`` volume rows of the
accumulator. Before windows starting at row ``zo`` are added, every row below
``zo + depth - pz`` can receive no more windows: those rows are handed, blended sums and weights,
to a :class:`RowSink` and the slab slides forward. Peak accumulator memory is therefore
``C x pz x Y x X`` instead of ``C x Z x Y x X``.

The sink decides what a final row becomes. :class:`LabelSink` turns rows of the volume's own
grid into labels, confidence, optional probabilities and running totals with the native
``finalize`` and ``probabilities`` kernels (one element math); a resampling sink
(spacing-aware relabelling) can take the same rows in the model's grid and emit rows of the
native grid. Everything here is testable with hand-made window outputs and no network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from atso_fast.kernels import native, reference

__all__ = ["ArrayBackend", "LabelSink", "RowSink", "SlabMerger", "Totals", "label_dtype", "z_runs"]


def label_dtype(num_classes: int, ignore_index: int) -> np.dtype:
    """uint8 labels, or uint16 when a class index or ``ignore_index`` exceeds 255 (the kernel's
    rule, :func:`atso_fast.kernels.native.label_dtype`)."""
    return native.label_dtype(num_classes, ignore_index)


def z_runs(z: np.ndarray) -> list[tuple[int, int]]:
    """``[lo, hi)`` index runs of equal values in the z-sorted window starts ``z``."""
    cuts = np.flatnonzero(np.diff(z)) + 1
    edges = [0, *cuts.tolist(), len(z)]
    return list(zip(edges[:-1], edges[1:]))


class ArrayBackend:
    """Where the accumulator lives: host NumPy arrays, or CUDA torch tensors."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.device = device
        if self.cuda:
            import torch

            self.torch = torch

    def zeros(self, shape: tuple[int, ...], dtype: str) -> Any:
        if self.cuda:
            return self.torch.zeros(shape, dtype=getattr(self.torch, dtype), device=self.device)
        return np.zeros(shape, dtype)

    def upload(self, array: np.ndarray) -> Any:
        return self.torch.from_numpy(array).to(self.device) if self.cuda else array

    def to_host(self, array: Any) -> np.ndarray:
        return array.cpu().numpy() if self.cuda else array

    def shift_rows(self, acc: Any, wsum: Any, k: int) -> None:
        """Drop the first ``k`` slab rows, move the rest up, zero the freed tail."""
        depth = wsum.shape[0]
        if self.cuda:
            acc[:, : depth - k] = acc[:, k:].clone()
            wsum[: depth - k] = wsum[k:].clone()
        else:
            # channel by channel: an overlapping NumPy copy goes through a temporary, and one
            # for the whole slab (C/2 x Y x X) would be the largest buffer of the pass
            for ch in range(acc.shape[0]):
                acc[ch, : depth - k] = acc[ch, k:]
            wsum[: depth - k] = wsum[k:]
        acc[:, depth - k :] = 0
        wsum[depth - k :] = 0

    def flip(self, batch: Any, axes: tuple[int, ...]) -> Any:
        if self.cuda:
            return self.torch.flip(batch, axes)
        return np.ascontiguousarray(np.flip(batch, axes))

    def probabilities(self, acc: Any, wsum: Any, kind: str, count: int) -> np.ndarray:
        """Blended probabilities ``(C, count, Y, X)`` float32 of slab rows ``[0, count)``, on the
        host: ``native.probabilities``, the very softmax (sigmoid) ``native.finalize`` takes the
        labels and confidence from, NaN where it counts a voxel invalid."""
        return self.to_host(native.probabilities(acc, wsum, kind, rows=(0, count)))


class RowSink(Protocol):
    """Receives the slab rows that can receive no more windows."""

    def take(self, acc: Any, wsum: Any, z_start: int, count: int) -> None:
        """Slab rows ``[0, count)`` of ``acc (C, D, Y, X)`` / ``wsum (D, Y, X)`` are final; they
        are volume rows ``[z_start, z_start + count)``. The sink must not keep references to
        them: the merger reuses the slab."""


@dataclass
class Totals:
    """Running per-class voxel counts, below-threshold and invalid voxels of a volume."""

    counts: np.ndarray
    ignored: int = 0
    invalid: int = 0


class LabelSink:
    """Final rows of the volume's grid -> labels, confidence, optional probabilities, totals.

    Args:
        shape: ``(Z, Y, X)`` of the volume.
        num_classes: output channels C (1: a sigmoid foreground channel).
        kind: ``"logits"`` or ``"probabilities"``.
        threshold: max probability below which a voxel gets ``ignore_index``.
        ignore_index: label of ignored and invalid voxels.
        backend: where the slab lives.
        save_probabilities: also keep ``(C, Z, Y, X)`` float32 probabilities (NaN where a voxel
            is invalid).
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        num_classes: int,
        *,
        kind: str,
        threshold: float,
        ignore_index: int,
        backend: ArrayBackend,
        save_probabilities: bool = False,
    ):
        self.kind, self.threshold, self.ignore_index, self.backend = kind, threshold, ignore_index, backend
        self.labels = np.empty(shape, label_dtype(num_classes, ignore_index))
        self.confidence = np.empty(shape, np.uint8)
        self.probabilities = np.empty((num_classes, *shape), np.float32) if save_probabilities else None
        self.totals = Totals(np.zeros(reference.num_label_classes(num_classes), np.int64))

    def take(self, acc: Any, wsum: Any, z_start: int, count: int) -> None:
        res = native.finalize(acc, wsum, self.threshold, self.ignore_index, self.kind, rows=(0, count))
        self.store(res, z_start)
        if self.probabilities is not None:
            rows = slice(z_start, z_start + count)
            self.probabilities[:, rows] = self.backend.probabilities(acc, wsum, self.kind, count)

    def store(self, res: native.FinalizeResult, z_start: int) -> None:
        """Rows ``[z_start, z_start + len(res.labels))`` finalised elsewhere (``native.finalize``
        or ``native.resample_finalize`` with this sink's threshold, ignore_index and kind)."""
        rows = slice(z_start, z_start + res.labels.shape[0])
        self.labels[rows] = self.backend.to_host(res.labels)
        self.confidence[rows] = self.backend.to_host(res.confidence)
        self.totals.counts += res.counts
        self.totals.ignored += res.ignored
        self.totals.invalid += res.invalid

    def mark_invalid(self, mask: np.ndarray) -> None:
        """Relabel the voxels of ``mask (Z, Y, X)`` as invalid (e.g. NaN/inf input voxels), with
        the totals corrected: they move from their class or the ignored count to ``invalid``."""
        k = len(self.totals.counts)
        hit = self.labels[mask]
        self.totals.counts -= np.bincount(hit[hit < k].astype(np.int64), minlength=k)[:k]
        self.totals.ignored -= int((hit == self.ignore_index).sum())
        self.totals.invalid += int(mask.sum())
        self.labels[mask] = self.ignore_index
        self.confidence[mask] = 0
        if self.probabilities is not None:
            self.probabilities[:, mask] = np.nan


class SlabMerger:
    """Gaussian-weighted blending of z-ordered windows into a sliding slab of rows.

    Args:
        shape: ``(Z, Y, X)`` of the grid the windows tile.
        num_classes: channels C of the window outputs.
        window_depth: ``pz``, the windows' extent along z.
        sink: receives every row once it is final (:class:`RowSink`).
        backend: where the slab lives (host or CUDA).
        accumulate_dtype: ``"float32"`` or ``"float16"`` accumulator.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        num_classes: int,
        window_depth: int,
        sink: RowSink,
        *,
        backend: ArrayBackend,
        accumulate_dtype: str = "float32",
    ):
        if accumulate_dtype not in ("float32", "float16"):
            raise ValueError(f"accumulate_dtype must be 'float32' or 'float16', got {accumulate_dtype!r}")
        self.shape, self.window_depth, self.sink, self.backend = tuple(shape), int(window_depth), sink, backend
        depth = min(self.window_depth, self.shape[0])
        self.acc = backend.zeros((num_classes, depth, *self.shape[1:]), accumulate_dtype)
        self.wsum = backend.zeros((depth, *self.shape[1:]), "float32")
        self.start = 0  # volume row of slab row 0
        self.closed = False

    def aggregate(self, outputs: Any, origins: np.ndarray, importance: Any) -> None:
        """Add window outputs ``(B, C, pz, py, px)`` at ``origins (B, 3)`` (volume coordinates,
        z non-decreasing across calls) weighted by ``importance (pz, py, px)``."""
        if self.closed:
            raise RuntimeError("SlabMerger.aggregate after finalize")
        origins = np.asarray(origins, np.int64)
        for lo, hi in z_runs(origins[:, 0]):
            self._advance(int(origins[lo, 0]))
            native.accumulate(self.acc, self.wsum, outputs[lo:hi], origins[lo:hi], importance, self.start)

    def finalize(self) -> RowSink:
        """Hand the remaining rows to the sink; returns the sink."""
        if not self.closed:
            self._flush(self.shape[0] - self.start)
            self.closed = True
        return self.sink

    def _advance(self, zo: int) -> None:
        """Slide the slab so windows starting at row ``zo`` fit; rows that can receive no more
        windows (windows come in z order) go to the sink first."""
        if max(zo, 0) < self.start:  # windows of a volume thinner than pz may start above row 0
            raise ValueError(
                f"windows must come in z order: a window starts at row {zo}, but rows "
                f"below {self.start} are already final"
            )
        depth = self.wsum.shape[0]
        need_end = min(zo + self.window_depth, self.shape[0])
        while need_end > self.start + depth:  # more than one slab only across a gap in the grid
            shift = min(need_end - depth - self.start, depth)
            self._flush(shift)
            self.backend.shift_rows(self.acc, self.wsum, shift)
            self.start += shift

    def _flush(self, rows: int) -> None:
        if rows > 0:
            self.sink.take(self.acc, self.wsum, self.start, rows)
