"""CT-like synthetic abdominal phantoms with voxel labels, for tests, demos and experiments.

Each phantom is an abdomen-like elliptic cylinder of soft tissue in air, holding a few organs of
random shape, position and orientation with distinct Hounsfield units, plus a small low-contrast
target (a lesion) inside the first organ. The clean image is blurred (partial-volume effect) and
gaussian noise is added. Every phantom is a pure function of ``(seed, index)``, so any count can be
drawn in any order and the same case always comes back.

Class layout (``num_organs`` = K, ``target=True``):
    0 = background (air and body tissue), 1..K = organs, K + 1 = target.

Arrays follow the package convention ``(Z, Y, X)``; a 2D phantom is a depth-1 volume ``(1, Y, X)``
(a slice through a 3D phantom at a random height).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "synthetic_ct",
    "ORGAN_HU",
    "phantom_num_classes",
    "phantom_class_names",
    "make_phantom",
    "make_phantom_2d",
    "make_phantoms",
    "make_archive",
]

# (name, mean HU, per-scan HU jitter, semi-axis range (z, y, x) in normalised units)
ORGAN_HU: tuple[tuple[str, float, float, tuple[tuple[float, float], ...]], ...] = (
    ("liver", 60.0, 8.0, ((0.45, 0.7), (0.28, 0.38), (0.25, 0.35))),
    ("kidney", 150.0, 20.0, ((0.25, 0.4), (0.12, 0.18), (0.1, 0.15))),
    ("spleen", 45.0, 8.0, ((0.3, 0.5), (0.14, 0.2), (0.12, 0.18))),
    ("bone", 400.0, 60.0, ((0.8, 1.0), (0.08, 0.11), (0.08, 0.11))),
)
_AIR_HU = -1000.0
_TISSUE_HU = -60.0
_TARGET_CONTRAST = (-35.0, -18.0)  # target HU relative to its host organ
_TARGET_RADIUS = (0.07, 0.12)


def phantom_num_classes(num_organs: int = 3, target: bool = True) -> int:
    """Number of label classes (background included) of phantoms drawn with these options."""
    _check_organs(num_organs)
    return num_organs + 1 + int(bool(target))


def phantom_class_names(num_organs: int = 3, target: bool = True) -> list[str]:
    """Class names in label order: ``["background", organs..., "target"]``."""
    _check_organs(num_organs)
    names = ["background"] + [ORGAN_HU[i][0] for i in range(num_organs)]
    return names + (["target"] if target else [])


def _check_organs(num_organs: int) -> None:
    if not 1 <= int(num_organs) <= len(ORGAN_HU):
        raise ValueError(f"num_organs must be in [1, {len(ORGAN_HU)}], got {num_organs}")


def _check_shape(shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != ndim or min(shape) < 1:
        raise ValueError(f"shape must be {ndim} positive ints, got {shape}")
    return shape


def _smooth_field(rng: np.random.Generator, coords: tuple[np.ndarray, ...], terms: int = 4) -> np.ndarray:
    """A smooth random field in about [-1, 1]: a sum of random low-frequency sinusoids."""
    out = np.zeros(np.broadcast_shapes(*(c.shape for c in coords)), np.float32)
    for _ in range(terms):
        freq = rng.uniform(-3.0, 3.0, size=3)
        phase = rng.uniform(0.0, 2 * np.pi)
        out += np.sin(sum(f * c for f, c in zip(freq, coords)) + phase).astype(np.float32)
    return out / np.float32(np.sqrt(terms))


def _blob(
    rng: np.random.Generator, coords: tuple[np.ndarray, ...], center: np.ndarray, radii: np.ndarray, wobble: float
) -> np.ndarray:
    """Boolean mask of a randomly rotated (in-plane) and deformed ellipsoid."""
    z, y, x = (c - c0 for c, c0 in zip(coords, center))
    angle = rng.uniform(0, np.pi)
    yr = np.cos(angle) * y - np.sin(angle) * x
    xr = np.sin(angle) * y + np.cos(angle) * x
    r2 = (z / radii[0]) ** 2 + (yr / radii[1]) ** 2 + (xr / radii[2]) ** 2
    return r2 < (1.0 + wobble * _smooth_field(rng, coords)) ** 2


def _grid(zc: np.ndarray, shape_yx: Sequence[int]) -> tuple[np.ndarray, ...]:
    yc = np.linspace(-1.0, 1.0, shape_yx[0], dtype=np.float32)
    xc = np.linspace(-1.0, 1.0, shape_yx[1], dtype=np.float32)
    return (zc[:, None, None], yc[None, :, None], xc[None, None, :])


def _organ_center(rng: np.random.Generator, index: int, radii: np.ndarray) -> np.ndarray:
    """Organs sit at loosely anatomical places: liver on one side, spleen on the other."""
    side = {0: -0.35, 1: 0.3, 2: 0.4, 3: 0.0}[index]
    y0 = {0: -0.1, 1: 0.3, 2: -0.2, 3: 0.45}[index]
    return np.array(
        [rng.uniform(-0.2, 0.2), y0 + rng.uniform(-0.12, 0.12), side + rng.uniform(-0.12, 0.12)], np.float32
    )


def _paint(
    rng: np.random.Generator,
    coords: tuple[np.ndarray, ...],
    shape: tuple[int, ...],
    num_organs: int,
    target: bool,
    target_radius: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Clean HU image and labels on the grid ``coords``."""
    hu = np.full(shape, _AIR_HU, np.float32)
    label = np.zeros(shape, np.uint8)
    body_radii = np.array([10.0, rng.uniform(0.62, 0.8), rng.uniform(0.78, 0.92)], np.float32)
    body = _blob(rng, coords, np.zeros(3, np.float32), body_radii, 0.04)
    hu[body] = _TISSUE_HU + 35.0 * _smooth_field(rng, coords)[body]
    offset = rng.normal(0.0, 10.0)
    organ_hu = []
    for k in range(num_organs):
        _, mean_hu, jitter, ranges = ORGAN_HU[k]
        radii = np.array([rng.uniform(*r) for r in ranges], np.float32)
        mask = _blob(rng, coords, _organ_center(rng, k, radii), radii, 0.12) & body
        organ_hu.append(mean_hu + offset + rng.normal(0.0, jitter))
        hu[mask] = organ_hu[-1]
        label[mask] = k + 1
    if target:
        _paint_target(rng, coords, hu, label, organ_hu[0], num_organs + 1, target_radius)
    return hu, label


def _paint_target(
    rng: np.random.Generator,
    coords: tuple[np.ndarray, ...],
    hu: np.ndarray,
    label: np.ndarray,
    host_hu: float,
    target_label: int,
    target_radius: tuple[float, float],
) -> None:
    """A small low-contrast lesion centred on a random voxel of the first organ (if visible)."""
    host = np.argwhere(label == 1)
    if host.size == 0:
        return
    pos = host[rng.integers(len(host))]
    center = np.array([np.ravel(c)[min(p, np.size(c) - 1)] for c, p in zip(coords, pos)], np.float32)
    radius = rng.uniform(*target_radius)
    radii = np.array([radius * 1.5, radius, radius], np.float32)
    mask = _blob(rng, coords, center, radii, 0.15) & (label == 1)
    hu[mask] = host_hu + rng.uniform(*_TARGET_CONTRAST)
    label[mask] = target_label


def _finish(rng: np.random.Generator, hu: np.ndarray, noise_hu: float, blur_sigma: float) -> np.ndarray:
    """Partial-volume blur (in-plane, and along z for 3D) then gaussian noise; int16 HU."""
    sigma = (blur_sigma if hu.shape[0] > 1 else 0.0, blur_sigma, blur_sigma)
    if blur_sigma > 0:
        hu = ndimage.gaussian_filter(hu, sigma=sigma, mode="nearest")
    hu = hu + rng.normal(0.0, noise_hu, size=hu.shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def _check_common(
    noise_hu: float, blur_sigma: float, num_organs: int, target_radius: Sequence[float]
) -> tuple[float, float]:
    _check_organs(num_organs)
    if noise_hu < 0 or blur_sigma < 0:
        raise ValueError(f"noise_hu and blur_sigma must be >= 0, got {noise_hu}, {blur_sigma}")
    lo, hi = (float(r) for r in target_radius)
    if not 0 < lo <= hi:
        raise ValueError(f"target_radius must be (lo, hi) with 0 < lo <= hi, got {tuple(target_radius)}")
    return lo, hi


def make_phantom(
    shape: Sequence[int] = (32, 64, 64),
    *,
    seed: int = 0,
    index: int = 0,
    num_organs: int = 3,
    target: bool = True,
    noise_hu: float = 20.0,
    blur_sigma: float = 0.8,
    target_radius: Sequence[float] = _TARGET_RADIUS,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one 3D CT-like phantom.

    Args:
        shape: ``(Z, Y, X)`` voxels.
        seed, index: the phantom is a pure function of ``(seed, index)``.
        num_organs: organs 1..K (at most ``len(ORGAN_HU)``).
        target: add a small low-contrast target inside organ 1 (label K + 1).
        noise_hu: standard deviation of the additive gaussian noise, HU.
        blur_sigma: partial-volume blur (gaussian sigma in voxels).
        target_radius: in-plane radius range of the target, in units of half the field of view.

    Returns:
        ``(image, label)``: image ``(Z, Y, X)`` int16 HU, label ``(Z, Y, X)`` uint8.

    Raises:
        ValueError: bad shape, organ count, noise or blur.
    """
    shape = _check_shape(shape, 3)
    radius = _check_common(noise_hu, blur_sigma, num_organs, target_radius)
    rng = np.random.default_rng([int(seed), int(index), 3])
    coords = _grid(np.linspace(-1.0, 1.0, shape[0], dtype=np.float32), shape[1:])
    hu, label = _paint(rng, coords, shape, num_organs, target, radius)
    return _finish(rng, hu, noise_hu, blur_sigma), label


def make_phantom_2d(
    shape: Sequence[int] = (64, 64),
    *,
    seed: int = 0,
    index: int = 0,
    num_organs: int = 3,
    target: bool = True,
    noise_hu: float = 20.0,
    blur_sigma: float = 0.8,
    target_radius: Sequence[float] = _TARGET_RADIUS,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one 2D phantom: a slice through a 3D phantom at a random height.

    Args:
        shape: ``(Y, X)`` pixels. Other arguments as :func:`make_phantom`.

    Returns:
        ``(image, label)``: depth-1 volumes ``(1, Y, X)``, int16 HU and uint8.
    """
    shape = _check_shape(shape, 2)
    radius = _check_common(noise_hu, blur_sigma, num_organs, target_radius)
    rng = np.random.default_rng([int(seed), int(index), 2])
    coords = _grid(np.array([rng.uniform(-0.3, 0.3)], np.float32), shape)
    hu, label = _paint(rng, coords, (1, *shape), num_organs, target, radius)
    return _finish(rng, hu, noise_hu, blur_sigma), label


def make_phantoms(
    n: int, shape: Sequence[int] = (32, 64, 64), *, seed: int = 0, start: int = 0, **kwargs: Any
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Draw phantoms ``start .. start + n - 1``; ``len(shape) == 2`` gives 2D ones ``(1, Y, X)``.

    Returns:
        list of ``(image int16, label uint8)``; see :func:`make_phantom`.
    """
    if int(n) < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    maker = make_phantom_2d if len(tuple(shape)) == 2 else make_phantom
    return [maker(shape, seed=seed, index=start + i, **kwargs) for i in range(int(n))]


def _save(path: Path, array: np.ndarray, spacing: Sequence[float]) -> None:
    """Write ``(Z, Y, X)`` as NIfTI ``(X, Y, Z)`` (nibabel order) or as ``.npy``."""
    if path.name.endswith(".npy"):
        np.save(path, array)
        return
    import nibabel as nib

    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
    img.set_data_dtype(array.dtype)
    nib.save(img, str(path))


def _archive_layout(n: int, num_labelled: int | None, labelled_fraction: float, num_val: int) -> tuple[int, int]:
    if int(n) < 1 or int(num_val) < 0:
        raise ValueError(f"make_archive needs n >= 1 and num_val >= 0, got n={n}, num_val={num_val}")
    if num_labelled is None:
        if not 0.0 < labelled_fraction <= 1.0:
            raise ValueError(f"labelled_fraction must be in (0, 1], got {labelled_fraction}")
        num_labelled = max(1, int(round(n * labelled_fraction)))
    if not 1 <= int(num_labelled) <= int(n):
        raise ValueError(f"num_labelled must be in [1, n={n}], got {num_labelled}")
    return int(num_labelled), int(n) - int(num_labelled)


def make_archive(
    folder: str | Path,
    n: int,
    *,
    num_labelled: int | None = None,
    labelled_fraction: float = 0.2,
    num_val: int = 4,
    shape: Sequence[int] = (32, 64, 64),
    seed: int = 0,
    fmt: str = "nii.gz",
    spacing: Sequence[float] = (2.5, 1.5, 1.5),
    unlabelled_truth: bool = False,
    **phantom_kwargs: Any,
) -> dict[str, Any]:
    """Write an nnU-Net-style archive of phantoms.

    Layout: ``imagesTr/ labelsTr/`` (labelled), ``imagesUn/`` (unlabelled; ``labelsUn/`` with the
    hidden truth when ``unlabelled_truth``), ``imagesVal/ labelsVal/`` and ``dataset.json``.
    Images are named ``phantom_NNNN_0000.<fmt>``, labels ``phantom_NNNN.<fmt>``.

    Args:
        folder: output folder (created).
        n: training cases, labelled + unlabelled.
        num_labelled: labelled count; default ``round(n * labelled_fraction)`` (at least 1).
        num_val: validation cases (labelled), drawn after the training cases.
        shape: ``(Z, Y, X)`` or ``(Y, X)`` (2D phantoms saved as ``(1, Y, X)``).
        seed: phantom seed; case ``i`` is ``make_phantom(shape, seed=seed, index=i)``.
        fmt: ``"nii.gz"``, ``"nii"`` or ``"npy"``.
        spacing: ``(z, y, x)`` mm written into the NIfTI affine.
        unlabelled_truth: also write ``labelsUn/`` (for measuring pseudo-label quality only).
        **phantom_kwargs: passed to the phantom generator.

    Returns:
        dict with ``root`` and lists ``labelled`` / ``unlabelled`` / ``val`` of
        ``{"image": path, "label": path | None}`` entries (strings), and ``num_classes``.

    Raises:
        ValueError: bad counts or format.
    """
    if fmt not in ("nii.gz", "nii", "npy"):
        raise ValueError(f"fmt must be 'nii.gz', 'nii' or 'npy', got {fmt!r}")
    n_lab, n_unl = _archive_layout(n, num_labelled, labelled_fraction, num_val)
    root = Path(folder)
    groups = [
        ("Tr", 0, n_lab, True),
        ("Un", n_lab, n_unl, unlabelled_truth),
        ("Val", n_lab + n_unl, int(num_val), True),
    ]
    out: dict[str, Any] = {"root": str(root)}
    for (suffix, start, count, with_label), key in zip(groups, ("labelled", "unlabelled", "val")):
        out[key] = _write_group(
            root, suffix, start, count, with_label, shape, seed, fmt, tuple(float(s) for s in spacing), phantom_kwargs
        )
    num_classes = phantom_num_classes(phantom_kwargs.get("num_organs", 3), phantom_kwargs.get("target", True))
    names = phantom_class_names(phantom_kwargs.get("num_organs", 3), phantom_kwargs.get("target", True))
    meta = {
        "name": "atso_synthetic",
        "channel_names": {"0": "CT"},
        "labels": {name: i for i, name in enumerate(names)},
        "numTraining": n_lab,
        "numUnlabelled": n_unl,
        "numVal": int(num_val),
        "file_ending": "." + fmt,
        "seed": int(seed),
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    out["num_classes"] = num_classes
    return out


def _write_group(
    root: Path,
    suffix: str,
    start: int,
    count: int,
    with_label: bool,
    shape: Sequence[int],
    seed: int,
    fmt: str,
    spacing: Sequence[float],
    phantom_kwargs: dict[str, Any],
) -> list[dict[str, str | None]]:
    img_dir, lab_dir = root / f"images{suffix}", root / f"labels{suffix}"
    img_dir.mkdir(parents=True, exist_ok=True)
    if with_label:
        lab_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (image, label) in enumerate(make_phantoms(count, shape, seed=seed, start=start, **phantom_kwargs)):
        name = f"phantom_{start + i:04d}"
        img_path = img_dir / f"{name}_0000.{fmt}"
        _save(img_path, image, spacing)
        lab_path = lab_dir / f"{name}.{fmt}" if with_label else None
        if lab_path is not None:
            _save(lab_path, label, spacing)
        entries.append({"image": str(img_path), "label": None if lab_path is None else str(lab_path)})
    return entries


# fixed anatomy, fast at any size: the throughput benchmarks' volume (no labels)
_CT_BODY = (
    ((0.0, 0.05, 0.0), (1.3, 0.80, 0.92), -90.0),  # body outline: subcutaneous fat
    ((0.0, 0.05, 0.0), (1.3, 0.72, 0.85), 40.0),  # soft tissue
    ((0.1, -0.05, -0.42), (0.9, 0.45, 0.30), -820.0),  # lungs
    ((0.1, -0.05, 0.42), (0.9, 0.45, 0.30), -820.0),
    ((-0.45, 0.10, -0.15), (0.35, 0.30, 0.38), 60.0),  # liver
    ((-0.50, 0.30, 0.35), (0.18, 0.12, 0.10), 30.0),  # kidney
    ((0.0, 0.55, 0.0), (1.4, 0.10, 0.10), 700.0),  # spine
)


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0, noise_hu: float = 15.0) -> np.ndarray:
    """A CT-like int16 phantom ``(Z, Y, X)`` in HU: air, fat, soft tissue, lungs, organs, spine.

    Args:
        shape: ``(Z, Y, X)`` voxels, each >= 1.
        seed: seed of the gaussian noise (the anatomy itself is fixed).
        noise_hu: standard deviation of the added noise (so files do not gzip unrealistically well).

    Raises:
        ValueError: a non-positive size.
    """
    dims = tuple(int(s) for s in shape)
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"shape must be three positive integers (Z, Y, X), got {dims!r}")
    grids = [g.astype(np.float32) for g in np.ogrid[tuple(slice(-1.0, 1.0, complex(0, n)) for n in dims)]]
    vol = np.full(dims, -1000.0, np.float32)
    for centre, radii, hu in _CT_BODY:
        dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
        vol[dist <= 1.0] = hu
    vol += np.random.default_rng(seed).normal(0.0, noise_hu, dims).astype(np.float32)
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
