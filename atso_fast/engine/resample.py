"""Resampling the network's output back to the scan's grid, row by row, as rows become final.

:class:`ResampleSink` is a :class:`~atso_fast.engine.merger.RowSink` on the model's (target) grid.
The slab merger hands it blended target rows as soon as no later window covers them; each row of
the native (cropped) grid reads at most two target rows along z (order 1, or 0 along an
anisotropic z, as nnU-Net's ``resampling_fn_probabilities``), so it is computed, finished by the
inner :class:`~atso_fast.engine.merger.LabelSink` (softmax, argmax, threshold, confidence) and
dropped as soon as those target rows are final. Only the one or two target rows that later native
rows still need are kept between calls: memory stays ``O(C x window depth x Y x X)`` and no
``C x Z x Y x X`` logit volume ever exists, on either grid.

Like nnU-Net, the blended logits are divided by the blending weights on the target grid first and
the quotient is resampled (linear along each axis, weights from scipy; see
:mod:`atso_fast.engine.preprocess`). Runs with torch on the slab's device (threaded on CPU, CUDA
tensors on GPU). On the host, when both in-plane axes are linear, the in-plane step and the
label sink's finalisation run as one native pass (``native.resample_finalize``: aten's bilinear
arithmetic, so the labels are those of torch's bilinear followed by ``native.finalize``) wherever
aten itself would run that arithmetic (:func:`aten_generic_bilinear`), without the
``C x rows x Yn x Xn`` block in between.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from atso_fast.engine.merger import LabelSink
from atso_fast.engine.preprocess import AxisOp, apply_op
from atso_fast.kernels import native

if TYPE_CHECKING:
    import torch

__all__ = ["ResampleSink", "TimedSink", "aten_generic_bilinear", "bilinear_taps", "restore"]

_CHUNK_BYTES = 64 << 20
"""Native rows resampled per inner ``take`` call are bounded by this many bytes of float32."""


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """aten's ``upsample_bilinear2d`` taps along one axis (align_corners=False, no scale factor):
    ``(i0, i1, w0, w1)``, int64 and float32, ``(n_out,)`` each.

    As aten computes them: the source coordinate ``fma(n_in / n_out, o + 0.5, -0.5)`` in float32
    (its CPU build fuses it), clamped at 0; ``i1`` the next input but at the last; ``w1`` the
    fraction, ``w0 = 1 - w1``; equal sizes copy (``w0 = 1, w1 = 0``). Tests compare these with
    the weights torch applies.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"bilinear_taps needs n_in, n_out >= 1, got {n_in}, {n_out}")
    o = np.arange(n_out)
    if n_in == n_out:
        return o, o.copy(), np.ones(n_out, np.float32), np.zeros(n_out, np.float32)
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    src = (np.float64(scale) * (o.astype(f32) + f32(0.5)).astype(np.float64) - 0.5).astype(f32)  # exact fma
    src = np.maximum(src, f32(0))
    i0 = src.astype(np.int64)
    i1 = i0 + (i0 < n_in - 1)
    w1 = (src - i0.astype(f32)).astype(f32)
    return i0, i1, (f32(1) - w1).astype(f32), w1


def aten_generic_bilinear(n_out_y: int, n_out_x: int, planes: int, threads: int) -> bool:
    """Whether aten's CPU ``upsample_bilinear2d`` (contiguous, float32) runs its generic kernel,
    the arithmetic ``native.resample_finalize`` reproduces, on ``(N, planes, *, *)`` input.

    It runs a separable kernel, which rounds differently, for small outputs
    (``Yn + Xn <= 128``) and, on one thread, for 3 planes per batch item (aten's
    ``upsample_bilinear2d_kernel_impl_float``); the unfused path stays there, so the labels never
    depend on which path ran.
    """
    return n_out_y + n_out_x > 128 and not (threads == 1 and planes == 3)


class TimedSink:
    """A :class:`~atso_fast.engine.merger.RowSink` wrapper adding up the seconds its sink spends."""

    def __init__(self, sink: Any):
        self.sink, self.seconds = sink, 0.0

    def take(self, acc: Any, wsum: Any, z_start: int, count: int) -> None:
        start = time.perf_counter()
        self.sink.take(acc, wsum, z_start, count)
        self.seconds += time.perf_counter() - start


class ResampleSink:
    """Target-grid rows in, native-grid rows out (to ``inner``).

    Args:
        inner: a :class:`LabelSink` on the native (cropped) grid ``(Zn, Yn, Xn)``.
        ops: three two-tap maps target -> native, for z, y and x (``preprocess.Geometry.back``).
        cuda: the slab lives in CUDA tensors.
        fuse: run the in-plane step and the inner sink as one native pass where it gives the
            same labels (the module docstring); False: always torch's bilinear, then the sink.

    Attributes:
        seconds: time spent resampling and finishing rows.
    """

    def __init__(self, inner: LabelSink, ops: list[AxisOp], *, cuda: bool = False, fuse: bool = True):
        if any(op.idx0 is None for op in ops):
            raise ValueError("ResampleSink needs maps of at most two taps per output (orders 0 and 1)")
        self.inner, self.ops, self.cuda = inner, ops, cuda
        self.native = tuple(op.n_out for op in ops)
        z0, z1, _ = ops[0].two_taps()
        lo = np.minimum(z0, z1)
        hi = np.maximum(z0, z1)
        if np.any(np.diff(lo) < 0) or np.any(np.diff(hi) < 0):
            raise ValueError("the z map must read target rows in order")
        self._lo, self._hi = lo, hi
        self._next = 0  # next native row to emit
        # blended target rows (C, Yt, Xt) by index, each computed once and dropped as soon as no
        # later native row reads it (at most one survives a call; quotients are fresh tensors,
        # not views of the slab the merger reuses)
        self._rows: dict[int, Any] = {}
        # output buffers reused from row to row: allocating (and freeing) a C x Yn x Xn block
        # per native row cost more than the interpolation itself (page faults)
        self._buffers: dict[str, Any] = {}
        self._ones: torch.Tensor | None = None
        _, yop, xop = ops
        fusable = (
            fuse
            and not cuda
            and inner.probabilities is None
            and yop.order == 1
            and xop.order == 1
            and not (yop.identity and xop.identity)
        )
        # the fused in-plane + finalize pass (bilinear taps as aten's, per axis), or None
        self._taps = (bilinear_taps(yop.n_in, yop.n_out), bilinear_taps(xop.n_in, xop.n_out)) if fusable else None
        self.seconds = 0.0

    @property
    def done(self) -> bool:
        return self._next == self.native[0]

    def take(self, acc: Any, wsum: Any, z_start: int, count: int) -> None:
        """Target rows ``[z_start, z_start + count)`` (slab rows ``[0, count)``) are final."""
        start = time.perf_counter()
        import torch

        acc_t = acc if self.cuda else torch.from_numpy(acc)
        wsum_t = wsum if self.cuda else torch.from_numpy(wsum)
        end = z_start + count
        plane = self.inner.labels.shape[1] * self.inner.labels.shape[2] * max(acc_t.shape[0], 1) * 4
        max_rows = max(1, _CHUNK_BYTES // plane)
        while self._next < self.native[0] and self._hi[self._next] < end:
            k0 = k1 = self._next
            while k1 < self.native[0] and k1 - k0 < max_rows and self._hi[k1] < end:
                k1 += 1
            self._emit(k0, k1, acc_t, wsum_t, z_start)
            self._next = k1
            self._drop_unneeded(end)
        for t in range(max(self._need(end), z_start), end):  # what the next native row reads stays
            self._row(t, acc_t, wsum_t, z_start)
        self.seconds += time.perf_counter() - start

    def _need(self, end: int) -> int:
        """The first target row a native row from ``self._next`` on reads (``end`` when done)."""
        return int(self._lo[self._next]) if self._next < self.native[0] else end

    def _drop_unneeded(self, end: int) -> None:
        """Forget the target rows no native row from ``self._next`` on reads."""
        need = self._need(end)
        for t in [t for t in self._rows if t < need]:
            del self._rows[t]

    def _row(self, t: int, acc_t: Any, wsum_t: Any, z_start: int) -> Any:
        """Blended target row ``t``: ``acc / wsum`` (C, Yt, Xt) float32, computed once."""
        import torch

        row = self._rows.get(t)
        if row is None:
            i = t - z_start
            row = acc_t[:, i].float() / torch.clamp_min(wsum_t[i], 1e-12)[None]
            self._rows[t] = row
        return row

    def _buffer(self, name: str, shape: tuple[int, ...], like: Any) -> Any:
        """A reused float32 tensor of ``shape`` on ``like``'s device (grown as needed)."""
        import torch

        size = int(np.prod(shape))
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < size:
            buf = self._buffers[name] = torch.empty(size, dtype=torch.float32, device=like.device)
        return buf[:size].view(shape)

    def _emit(self, k0: int, k1: int, acc_t: Any, wsum_t: Any, z_start: int) -> None:
        """Native rows ``[k0, k1)``: z blend, in-plane resampling, then the inner sink."""
        import torch

        z0, z1, zw = self.ops[0].two_taps()
        first = self._row(int(z0[k0]), acc_t, wsum_t, z_start)
        rows = self._buffer("z", (first.shape[0], k1 - k0, *first.shape[1:]), first)
        for j, k in enumerate(range(k0, k1)):
            a = self._row(int(z0[k]), acc_t, wsum_t, z_start)
            w = float(zw[k])
            if w == 0.0:
                rows[:, j].copy_(a)
            else:
                torch.lerp(a, self._row(int(z1[k]), acc_t, wsum_t, z_start), w, out=rows[:, j])
        r = k1 - k0
        if self._taps is not None and self._fused(r):
            inner = self.inner
            y_taps, x_taps = self._taps
            inner.store(
                native.resample_finalize(rows.numpy(), y_taps, x_taps, inner.threshold, inner.ignore_index, inner.kind),
                k0,
            )
            return
        rows = self._in_plane(rows)
        if self._ones is None or self._ones.shape[0] < r:
            self._ones = torch.ones((r, *rows.shape[2:]), dtype=torch.float32, device=rows.device)
        ones = self._ones[:r]
        if self.cuda:
            self.inner.take(rows, ones, k0, r)
        else:
            self.inner.take(rows.numpy(), ones.numpy(), k0, r)

    def _fused(self, r: int) -> bool:
        """Whether ``r`` native rows of a fusable sink (``self._taps`` set) go through
        ``native.resample_finalize`` (see the module docstring)."""
        import torch

        _, yop, xop = self.ops
        return aten_generic_bilinear(yop.n_out, xop.n_out, r, torch.get_num_threads())

    def _in_plane(self, rows: Any) -> Any:
        """``(C, r, Yt, Xt)`` -> ``(C, r, Yn, Xn)``: one bilinear pass when both axes are linear
        (aten's ``upsample_bilinear2d`` into a reused buffer, align_corners=False: scipy's
        grid-mode coordinates and edge clamping), else the per-axis maps."""
        import torch

        _, yop, xop = self.ops
        if yop.identity and xop.identity:
            return rows
        if yop.order == 1 and xop.order == 1:
            out = self._buffer("plane", (*rows.shape[:2], yop.n_out, xop.n_out), rows)
            torch.ops.aten.upsample_bilinear2d.out(rows, [yop.n_out, xop.n_out], False, None, None, out=out)
            return out
        if yop.n_out * xop.n_in <= xop.n_out * yop.n_in:  # the axis that grows least first
            return apply_op(apply_op(rows, yop, 2), xop, 3).contiguous()
        return apply_op(apply_op(rows, xop, 3), yop, 2).contiguous()

    def finalize(self) -> LabelSink:
        """The inner sink, once every native row has been emitted."""
        if not self.done:
            raise RuntimeError(f"ResampleSink: only {self._next} of {self.native[0]} native rows were final")
        return self.inner


def restore(
    inner: LabelSink, geom: Any, *, num_classes: int, kind: str, threshold: float, ignore_index: int, backend: Any
) -> LabelSink:
    """The finished cropped network grid of ``inner`` put back on the scan's grid.

    Outside the crop box every voxel is background with probability 1 (nnU-Net's
    ``insert_crop_into_image`` and ``revert_cropping_on_probabilities``); the network's
    reorientation/transpose is undone. Returns ``inner`` itself when there is nothing to undo.

    Args:
        inner: the :class:`LabelSink` of the cropped network grid.
        geom: the volume's :class:`~atso_fast.engine.preprocess.Geometry`.
        num_classes, kind, threshold, ignore_index: as the inner sink's.
        backend: a host :class:`~atso_fast.engine.merger.ArrayBackend` (the outputs live on the host).
    """
    if not geom.cropped_away and not geom.reoriented:
        return inner
    full = LabelSink(
        geom.native,
        num_classes,
        kind=kind,
        threshold=threshold,
        ignore_index=ignore_index,
        backend=backend,
        save_probabilities=inner.probabilities is not None,
    )
    full.labels.fill(0)
    full.confidence.fill(255)
    geom.to_net(full.labels)[...] = inner.labels
    geom.to_net(full.confidence)[...] = inner.confidence
    if full.probabilities is not None:
        full.probabilities.fill(0.0)
        if num_classes > 1:  # softmax outputs: background certain; one sigmoid channel: foreground 0
            full.probabilities[0] = 1.0
        geom.to_net(full.probabilities)[...] = inner.probabilities
    full.totals.counts[:] = inner.totals.counts
    full.totals.counts[0] += int(np.prod(geom.native)) - int(np.prod(inner.labels.shape))
    full.totals.ignored, full.totals.invalid = inner.totals.ignored, inner.totals.invalid
    return full
