"""A scan brought to a model package's grid, and the geometry to bring the output back.

Steps, in nnU-Net's order (``DefaultPreprocessor.run_case_npy``): (reorient to RAS) -> transpose
(nnU-Net's ``transpose_forward``) -> crop to the nonzero bounding box -> normalise (per channel;
z-score may use the nonzero mask) -> resample to the target spacing. The network's blended output
goes back (:mod:`atso_fast.engine.resample`, row by row) to the cropped grid, is finished there
(softmax/argmax/threshold), then uncropped (background outside the box) and un-transposed /
un-reoriented onto the scan's own grid.

Resampling reproduces nnU-Net's ``resample_data_or_seg`` exactly (up to float32 rounding):
``skimage.transform.resize`` is ``scipy.ndimage.zoom`` (``mode="nearest"``, ``grid_mode=True``),
which for an axis-aligned zoom is a product of one linear map per axis. Each map is built once
by running scipy on unit impulses (so spline prefilter, boundary handling and coordinate rounding
are scipy's own) and applied with torch matrix products on the runtime's device (threaded BLAS on
CPU, CUDA tensors on GPU). The anisotropy rule: when the spacing ratio exceeds the threshold
(3), the low-resolution axis gets ``order_z`` (0: nearest) and the others ``order``; resize's
clipping to the input range is kept (per slice when separate, as nnU-Net).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from atso_fast.io.limits import check_bytes
from atso_fast.package import ModelPackage
from atso_fast.package.normalize import normalize, uses_mask

__all__ = ["RESAMPLE_SHARE", "AxisOp", "Geometry", "axis_op", "new_shape", "prepare", "ras_view", "separate_axis"]

RESAMPLE_SHARE = 3
"""The resampled float32 grid may take 1/3 of the memory budget: resampling holds it and one
intermediate axis product at once, and the engine its slab beside them."""


# ------------------------------------------------------------------------------ 1D maps
@dataclass(frozen=True)
class AxisOp:
    """A linear map from ``n_in`` to ``n_out`` samples along one axis.

    ``matrix (n_out, n_in)`` float64 always; when every row has at most two non-zero weights
    (orders 0 and 1) also ``idx0``, ``idx1`` int64 and ``w1`` float64 ``(n_out,)`` with
    ``out[k] = (1 - w1[k]) * in[idx0[k]] + w1[k] * in[idx1[k]]``.
    """

    n_in: int
    n_out: int
    order: int
    matrix: np.ndarray
    idx0: np.ndarray | None = None
    idx1: np.ndarray | None = None
    w1: np.ndarray | None = None
    identity: bool = False

    def two_taps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(idx0, idx1, w1)`` of a two-tap map.

        Raises:
            ValueError: the map has more than two taps per output (``idx0`` is None).
        """
        if self.idx0 is None or self.idx1 is None or self.w1 is None:
            raise ValueError(
                f"the order-{self.order} map {self.n_in} -> {self.n_out} has more than two taps per output"
            )
        return self.idx0, self.idx1, self.w1

    def sources(self, k: int) -> tuple[int, int]:
        """The first and last input sample output ``k`` reads (two-tap maps)."""
        idx0, idx1, _ = self.two_taps()
        return int(min(idx0[k], idx1[k])), int(max(idx0[k], idx1[k]))


def _taps(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    nz = np.abs(matrix) > 1e-12
    if nz.sum(axis=1).max(initial=0) > 2:
        return None
    n_out = matrix.shape[0]
    idx0 = np.argmax(nz, axis=1)
    last = matrix.shape[1] - 1 - np.argmax(nz[:, ::-1], axis=1)
    w1 = np.where(last > idx0, matrix[np.arange(n_out), last], 0.0)
    idx1 = np.where(last > idx0, last, idx0)
    return idx0.astype(np.int64), idx1.astype(np.int64), w1.astype(np.float64)


@lru_cache(maxsize=64)
def axis_op(n_in: int, n_out: int, order: int, kind: str = "zoom") -> AxisOp:
    """The map scipy applies along one axis (cached).

    Args:
        n_in, n_out: samples before and after.
        order: spline order.
        kind: ``"zoom"``: ``scipy.ndimage.zoom(order, mode="nearest", grid_mode=True)`` (what
            ``skimage.transform.resize`` runs); ``"coords"``: ``map_coordinates(order,
            mode="nearest")`` at ``n_in / n_out * (k + 0.5) - 0.5`` (nnU-Net's separate-z step).
    """
    from scipy import ndimage

    if n_in < 1 or n_out < 1:
        raise ValueError(f"axis sizes must be >= 1, got {n_in} -> {n_out}")
    matrix = np.zeros((n_out, n_in))
    if n_in == n_out and kind == "zoom":
        matrix = np.eye(n_in)
    else:
        coords = (float(n_in) / n_out * (np.arange(n_out) + 0.5) - 0.5)[None]
        for i in range(n_in):
            delta = np.zeros(n_in)
            delta[i] = 1.0
            if kind == "zoom":
                matrix[:, i] = ndimage.zoom(delta, n_out / n_in, order=order, mode="nearest", grid_mode=True)
            else:
                matrix[:, i] = ndimage.map_coordinates(delta, coords, order=order, mode="nearest")
    taps = _taps(matrix) if order <= 1 else None
    matrix.setflags(write=False)
    identity = n_in == n_out and bool(np.array_equal(matrix, np.eye(n_in)))
    idx0, idx1, w1 = taps if taps is not None else (None, None, None)
    return AxisOp(n_in, n_out, order, matrix, idx0, idx1, w1, identity=identity)


def new_shape(shape, old_spacing, new_spacing) -> tuple[int, ...]:
    """nnU-Net's ``compute_new_shape``: ``round(old / new * size)`` per axis."""
    return tuple(int(round(o / n * s)) for s, o, n in zip(shape, old_spacing, new_spacing))


def _lowres_axes(spacing) -> list[int]:
    spacing = np.asarray(spacing, np.float64)
    return [int(a) for a in np.where(max(spacing) / spacing == 1)[0]]


def separate_axis(current, new, force: bool | None, threshold: float) -> int | None:
    """nnU-Net's ``determine_do_sep_z_and_axis``: the axis resampled on its own (order_z), or None.

    ``force`` True/False overrides the rule (True: the low-resolution axis of ``current``);
    otherwise an axis is separate when ``current`` (else ``new``) has a spacing ratio above
    ``threshold``. Two or three equally coarse axes mean no separate axis.
    """
    if force is not None:
        axes = _lowres_axes(current) if force else None
    elif max(current) / min(current) > threshold:
        axes = _lowres_axes(current)
    elif max(new) / min(new) > threshold:
        axes = _lowres_axes(new)
    else:
        axes = None
    return axes[0] if axes is not None and len(axes) == 1 else None


def _axis_ops(shape_in, shape_out, orders: tuple[int, int], sep: int | None) -> list[AxisOp]:
    """One map per axis: ``orders[1]`` (map_coordinates) on ``sep``, ``orders[0]`` (zoom) elsewhere."""
    return [
        axis_op(int(i), int(o), orders[1], "coords") if a == sep else axis_op(int(i), int(o), orders[0])
        for a, (i, o) in enumerate(zip(shape_in, shape_out))
    ]


# ------------------------------------------------------------------------------ orientation
def ras_view(affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """``(perm, flip)`` bringing a ``(Z, Y, X)`` array whose stored index ``(x, y, z)`` maps to
    RAS world by ``affine`` onto the closest canonical (RAS+) grid: output axis ``k`` is input
    axis ``perm[k]``, reversed where ``flip[k]`` (nibabel's ``io_orientation``)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine, np.float64))
    perm, flip = [0, 0, 0], [False, False, False]
    for i, (world, sign) in enumerate(ornt):
        out_axis = 2 - int(world)  # RAS world axis j is array axis 2 - j of a canonical (Z, Y, X)
        perm[out_axis] = 2 - i
        flip[out_axis] = sign < 0
    return (perm[0], perm[1], perm[2]), (flip[0], flip[1], flip[2])


# (Ellipsis,) + slices rather than (Ellipsis, *slices): mypy reads a starred tuple inside [...] as
# Python 3.11 syntax even in parentheses, where Python 3.10 accepts it
def _flip_slices(flip) -> tuple[slice, ...]:
    """``[::-1]`` on each flipped axis, ``[:]`` on the others."""
    return tuple(slice(None, None, -1) if f else slice(None) for f in flip)


def _forward(array: np.ndarray, perm, flip) -> np.ndarray:
    """``array (..., Z, Y, X)`` viewed on the network's axes (no copy)."""
    lead = array.ndim - 3
    out = array.transpose(*range(lead), *(lead + p for p in perm))
    return out[(Ellipsis,) + _flip_slices(flip)]


def _backward(array: np.ndarray, perm, flip) -> np.ndarray:
    """The inverse of :func:`_forward` (a view)."""
    lead = array.ndim - 3
    unflipped = array[(Ellipsis,) + _flip_slices(flip)]
    inverse = [perm.index(k) for k in range(3)]
    return unflipped.transpose(*range(lead), *(lead + p for p in inverse))


# ------------------------------------------------------------------------------ the plan
@dataclass
class Geometry:
    """How one scan was brought to the network's grid (everything needed to go back).

    Shapes are ``(Z, Y, X)``: ``native`` of the scan, ``net`` after reorientation/transpose,
    ``cropped`` inside ``bbox`` (slices of the ``net`` grid), ``target`` after resampling.
    ``back`` holds the three maps target -> cropped of the output (None: no resampling).
    """

    native: tuple[int, int, int]
    perm: tuple[int, int, int] = (0, 1, 2)
    flip: tuple[bool, bool, bool] = (False, False, False)
    bbox: tuple[slice, slice, slice] = (slice(None), slice(None), slice(None))
    net: tuple[int, int, int] = (0, 0, 0)
    cropped: tuple[int, int, int] = (0, 0, 0)
    target: tuple[int, int, int] = (0, 0, 0)
    spacing: tuple[float, float, float] | None = None
    target_spacing: tuple[float, float, float] | None = None
    back: list[AxisOp] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def reoriented(self) -> bool:
        return self.perm != (0, 1, 2) or any(self.flip)

    @property
    def cropped_away(self) -> bool:
        return tuple(self.cropped) != tuple(self.net)

    def to_net(self, array: np.ndarray) -> np.ndarray:
        """``array (..., Z, Y, X)`` of the native grid on the cropped network grid (a view)."""
        return _forward(array, self.perm, self.flip)[(Ellipsis,) + self.bbox]

    def to_native(self, array: np.ndarray) -> np.ndarray:
        """``array (..., Z, Y, X)`` of the full network grid back on the native grid (a view)."""
        return _backward(array, self.perm, self.flip)


def _bbox(vol: np.ndarray) -> tuple[slice, slice, slice]:
    """nnU-Net's crop box: the bounding box of voxels nonzero in any channel (the whole grid
    when there are none, as ``get_bbox_from_mask``)."""
    nonzero = np.any(vol != 0, axis=0)
    out = []
    for axis in range(3):
        hit = np.flatnonzero(np.any(nonzero, axis=tuple(a for a in range(3) if a != axis)))
        out.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, nonzero.shape[axis]))
    return out[0], out[1], out[2]


def _nonzero_mask(vol: np.ndarray) -> np.ndarray:
    """nnU-Net's ``create_nonzero_mask``: nonzero in any channel, holes filled."""
    from scipy.ndimage import binary_fill_holes

    return binary_fill_holes(np.any(vol != 0, axis=0))


def _target_spacing(package: ModelPackage, spacing) -> tuple[float, float, float] | None:
    if package.spacing is None:
        return None
    target = list(package.spacing)
    if len(target) == 2:  # a 2D model keeps the distance between slices (nnU-Net's 2d config)
        target = [spacing[0], *target]
    z, y, x = (float(t) for t in target)  # a package's spacing has 2 or 3 entries (package.spec)
    return z, y, x


def _orientation(spec: dict, affine, geom: Geometry) -> None:
    if spec["orientation"] == "RAS":
        if affine is None:
            geom.notes.append("the package reorients scans to RAS but no affine was given: the scan is taken as stored")
        else:
            geom.perm, geom.flip = ras_view(affine)
    if spec["transpose"] is not None:
        t = spec["transpose"]
        a, b, c = t  # a permutation of (0, 1, 2) (package.spec)
        geom.perm = (geom.perm[a], geom.perm[b], geom.perm[c])
        geom.flip = (geom.flip[a], geom.flip[b], geom.flip[c])


def _zyx(sizes: Iterable[Any]) -> tuple[int, int, int]:
    """Three sizes as a ``(Z, Y, X)`` tuple of ints."""
    z, y, x = (int(n) for n in sizes)
    return z, y, x


def plan_geometry(vol: np.ndarray, package: ModelPackage, spacing, affine) -> Geometry:
    """The :class:`Geometry` of ``vol (M, Z, Y, X)`` for ``package`` (no voxel is touched)."""
    if vol.ndim != 4:
        raise ValueError(f"vol must be (M, Z, Y, X), got shape {vol.shape}")
    spec = package.preprocessing
    geom = Geometry(_zyx(vol.shape[1:]))
    _orientation(spec, affine, geom)
    net_view = _forward(vol, geom.perm, geom.flip)
    geom.net = _zyx(net_view.shape[1:])
    if spec["crop_to_nonzero"]:
        geom.bbox = _bbox(net_view)
    geom.cropped = _zyx(s.stop - s.start if s.start is not None else n for s, n in zip(geom.bbox, geom.net))
    geom.target = geom.cropped
    if spacing is not None:
        sz, sy, sx = (float(spacing[p]) for p in geom.perm)
        geom.spacing = (sz, sy, sx)
    if package.spacing is not None and geom.spacing is None:
        geom.notes.append(
            f"the scan has no spacing (e.g. a .npy file): it is taken to be at the model's spacing {package.spacing}"
        )
    elif package.spacing is not None:
        geom.target_spacing = _target_spacing(package, geom.spacing)
        geom.target = _zyx(new_shape(geom.cropped, geom.spacing, geom.target_spacing))
        if min(geom.target) < 1:
            raise ValueError(
                f"resampling {geom.cropped} voxels at {geom.spacing} mm to {geom.target_spacing} mm "
                "leaves an empty grid"
            )
        check_bytes(
            None,
            4 * vol.shape[0] * math.prod(geom.target),
            f"resampling {geom.cropped} voxels at "
            f"{geom.spacing} mm to {geom.target_spacing} mm (grid {geom.target}, float32)",
            share=RESAMPLE_SHARE,
        )
        if geom.target != geom.cropped:
            res = spec["resampling"]
            sep = separate_axis(geom.target_spacing, geom.spacing, res["separate_z"], res["anisotropy_threshold"])
            geom.back = _axis_ops(
                geom.target, geom.cropped, (res["probabilities_order"], res["probabilities_order_z"]), sep
            )
    return geom


# ------------------------------------------------------------------------------ voxels
def prepare(
    vol: np.ndarray,
    package: ModelPackage,
    *,
    spacing=None,
    affine=None,
    normalized: bool = False,
    invalid: np.ndarray | None = None,
    device: str = "cpu",
) -> tuple[np.ndarray, Geometry]:
    """``vol (M, Z, Y, X)`` float32 on the network's grid, and its :class:`Geometry`.

    Args:
        vol: the scan, NaN-free float32.
        package: whose ``preprocessing``, ``spacing`` and ``normalization`` apply.
        spacing: the scan's ``(Z, Y, X)`` spacing in mm, or None (unknown).
        affine: its RAS voxel-to-world affine (for ``orientation: "RAS"``), or None.
        normalized: the intensities are already normalised (skip that step).
        invalid: ``(Z, Y, X)`` bool, voxels set to 0 after normalisation (NaN/inf input).
        device: where resampling runs (``"cpu"`` or ``"cuda[:N]"``).

    Returns:
        ``(volume, geometry)``: a C-contiguous float32 NumPy array of the target grid
        ``(M, *geometry.target)`` (resampled on ``device``, then brought to the host: the engine
        uploads the target grid, usually several times smaller than the scan).
    """
    geom = plan_geometry(vol, package, spacing, affine)
    data = geom.to_net(vol)
    mask = None
    if not normalized and uses_mask(package.normalization):
        mask = _nonzero_mask(data)
    if not normalized:
        data = normalize(data, package.normalization, mask)
    if invalid is not None:
        bad = geom.to_net(invalid)
        data = np.where(bad[None], np.float32(0.0), data)
    data = np.ascontiguousarray(data, dtype=np.float32)
    if geom.target != geom.cropped:
        data = _resample_data(data, geom, package.preprocessing["resampling"], device)
    return data, geom


def _resample_data(data: np.ndarray, geom: Geometry, res: dict, device: str) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg`` (is_seg False) of ``data (M, *cropped)`` to the target grid."""
    import torch

    sep = separate_axis(geom.spacing, geom.target_spacing, res["separate_z"], res["anisotropy_threshold"])
    ops = _axis_ops(geom.cropped, geom.target, (res["data_order"], res["data_order_z"]), sep)
    t = torch.from_numpy(data)
    if device.startswith("cuda"):
        t = t.to(device)
    first = [a for a in range(3) if a != sep] if sep is not None else [0, 1, 2]
    clip_axes = (sep + 1,) if sep is not None else ()  # per slice when separate, else per channel
    reduce = tuple(a for a in range(1, 4) if a not in clip_axes)
    lo, hi = (t.amin(dim=reduce, keepdim=True), t.amax(dim=reduce, keepdim=True))
    for axis in sorted(first, key=lambda a: ops[a].n_out / ops[a].n_in):
        t = apply_op(t, ops[axis], axis + 1)
    if max(ops[a].order for a in first) > 1:
        t = torch.minimum(torch.maximum(t, lo), hi)  # skimage's resize clips to the input range
    if sep is not None:
        t = apply_op(t, ops[sep], sep + 1)
    return np.ascontiguousarray(t.cpu().numpy())


def apply_op(t: Any, op: AxisOp, dim: int) -> Any:
    """``op`` along dimension ``dim`` of a float32 torch tensor (a dense matrix product, or two
    gathers and a lerp for two-tap maps)."""
    import torch

    if op.identity:
        return t
    if op.idx0 is not None:
        idx0, idx1, w1 = op.two_taps()
        shape = [1] * t.dim()
        shape[dim] = op.n_out
        i0 = torch.from_numpy(idx0).to(t.device)
        a = t.index_select(dim, i0)
        if not np.any(w1):
            return a
        b = t.index_select(dim, torch.from_numpy(idx1).to(t.device))
        return torch.lerp(a, b, torch.from_numpy(w1.astype(np.float32)).to(t.device).reshape(shape))
    return _banded_product(t.contiguous(), op, dim)


def _bands(matrix: np.ndarray, rows: int = 64, tol: float = 1e-9) -> list[tuple[int, int, int, int]]:
    """``(r0, r1, c0, c1)`` blocks of ``rows`` output rows and the input columns they read.

    A cubic spline map is dense (its prefilter is an IIR filter) but its weights fall by about
    3.7x per sample away from the diagonal; weights below ``tol`` of the largest (far below
    float32 rounding) are left out, so each block reads a short band of the input."""
    keep = np.abs(matrix) > tol * max(float(np.abs(matrix).max()), 1e-300)
    out = []
    for r0 in range(0, matrix.shape[0], rows):
        r1 = min(r0 + rows, matrix.shape[0])
        cols = np.flatnonzero(keep[r0:r1].any(axis=0))
        out.append((r0, r1, int(cols[0]) if cols.size else 0, int(cols[-1]) + 1 if cols.size else 1))
    return out


def _banded_product(t: Any, op: AxisOp, dim: int) -> Any:
    """``op.matrix`` applied along ``dim`` of a contiguous tensor, block by block (BLAS)."""
    import torch

    shape = list(t.shape)
    before, after = int(np.prod(shape[:dim])), int(np.prod(shape[dim + 1 :]))
    mat = torch.from_numpy(np.ascontiguousarray(op.matrix, dtype=np.float32)).to(t.device)
    out_shape = shape[:dim] + [op.n_out] + shape[dim + 1 :]
    out = torch.empty(out_shape, dtype=t.dtype, device=t.device)
    if after == 1:  # the last axis: rows of a 2D product
        src, dst = t.reshape(before, shape[dim]), out.reshape(before, op.n_out)
        for r0, r1, c0, c1 in _bands(op.matrix):
            torch.matmul(src[:, c0:c1], mat[r0:r1, c0:c1].T, out=dst[:, r0:r1])
        return out
    src, dst = t.reshape(before, shape[dim], after), out.reshape(before, op.n_out, after)
    for r0, r1, c0, c1 in _bands(op.matrix):
        dst[:, r0:r1] = torch.matmul(mat[r0:r1, c0:c1], src[:, c0:c1])
    return out
