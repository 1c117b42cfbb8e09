"""Native kernels (CPU and CUDA) against the NumPy reference, plus known answers.

Every kernel runs on three paths: ``cpu`` (the blocked CPU kernels), ``cpu-thread`` (the CUDA
kernels' per-thread algorithm as a host loop over the same code, on every CI machine) and
``cuda`` (on a GPU). The first two must agree bit for bit.
"""

from __future__ import annotations

import inspect
import re

import ml_dtypes
import numpy as np
import pytest
from conftest import to_numpy

PATHS = ["cpu", "cpu-thread", pytest.param("cuda", marks=pytest.mark.cuda)]
THREAD_ALGORITHM = {"extract_patches": "element", "accumulate": "gather", "finalize": "voxel"}
BF16 = np.dtype(ml_dtypes.bfloat16)  # window patches may be bfloat16 (a network's bf16 output)


def to_device(array: np.ndarray, path: str):
    """numpy on the host paths, a torch CUDA tensor on cuda."""
    if path != "cuda":
        return np.ascontiguousarray(array)
    import torch

    if array.dtype == BF16:  # torch cannot take ml_dtypes' bfloat16 directly: the same bits
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16).to("cuda")
    return torch.from_numpy(np.ascontiguousarray(array)).to("cuda")


def algo(path: str, kernel: str) -> dict:
    """The ``algorithm`` keyword of ``kernel`` on ``path``."""
    return {"algorithm": THREAD_ALGORITHM[kernel] if path == "cpu-thread" else "auto"}


from atso_fast.engine.windows import gaussian_importance, sliding_window_origins
from atso_fast.kernels import native, reference

# (volume ZYX, patch, overlap): smaller than the window, odd sizes, overlap 0, thin slabs.
GRIDS = [
    ((5, 6, 7), (8, 8, 8), 0.5),
    ((17, 23, 19), (8, 10, 6), 0.5),
    ((16, 16, 16), (8, 8, 8), 0.0),
    ((9, 31, 12), (4, 16, 16), 0.75),
    ((1, 20, 20), (1, 8, 8), 0.25),
]


def corner_origins(vol, patch):
    """One window hanging over each of the 8 corners, plus one fully inside if it fits."""
    out = []
    for cz in (-patch[0] // 2, vol[0] - patch[0] // 2):
        for cy in (-patch[1] // 2, vol[1] - patch[1] // 2):
            for cx in (-patch[2] // 2, vol[2] - patch[2] // 2):
                out.append((cz, cy, cx))
    return np.asarray(out, np.int64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("vol,patch,overlap", GRIDS)
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
def test_extract_patches_matches_reference(rng, path, vol, patch, overlap, channels, out_dtype):
    volume = rng.standard_normal((channels, *vol), dtype=np.float32)
    origins = np.concatenate([sliding_window_origins(vol, patch, overlap), corner_origins(vol, patch)])
    got = native.extract_patches(
        to_device(volume, path), origins, patch, pad_value=-3.0, out_dtype=out_dtype, **algo(path, "extract_patches")
    )
    want = reference.extract_patches(volume, origins, patch, pad_value=-3.0, out_dtype=out_dtype)
    np.testing.assert_array_equal(to_numpy(got), want)


@pytest.mark.parametrize("path", ["cpu", "cpu-thread"])
def test_extract_patches_3d_volume_and_empty_batch(rng, path):
    volume = rng.standard_normal((6, 7, 8), dtype=np.float32)
    got = native.extract_patches(volume, np.zeros((0, 3), np.int64), (4, 4, 4), **algo(path, "extract_patches"))
    assert got.shape == (0, 1, 4, 4, 4)
    got = native.extract_patches(volume, [[0, 0, 0]], (6, 7, 8), **algo(path, "extract_patches"))
    np.testing.assert_array_equal(got[0, 0], volume)


def run_accumulate(rng, path, vol, patch, overlap, channels, patch_dtype, acc_dtype, z0, zs):
    origins = np.concatenate([sliding_window_origins(vol, patch, overlap), corner_origins(vol, patch)])
    patches = rng.standard_normal((len(origins), channels, *patch), dtype=np.float32).astype(patch_dtype)
    imp = np.ascontiguousarray(gaussian_importance(patch))
    acc = np.zeros((channels, zs, vol[1], vol[2]), acc_dtype)
    wsum = np.zeros((zs, vol[1], vol[2]), np.float32)
    acc_d, wsum_d = to_device(acc, path), to_device(wsum, path)
    native.accumulate(
        acc_d, wsum_d, to_device(patches, path), origins, to_device(imp, path), z0, **algo(path, "accumulate")
    )
    reference.accumulate(acc, wsum, patches, origins, imp, z0)
    return to_numpy(acc_d), to_numpy(wsum_d), acc, wsum


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("vol,patch,overlap", GRIDS)
@pytest.mark.parametrize("channels", [1, 2, 105])
@pytest.mark.parametrize("patch_dtype", [np.float32, np.float16, BF16])
def test_accumulate_matches_reference(rng, path, vol, patch, overlap, channels, patch_dtype):
    got_acc, got_w, want_acc, want_w = run_accumulate(
        rng, path, vol, patch, overlap, channels, patch_dtype, np.float32, 0, vol[0]
    )
    # Same additions in the same order, no FMA contraction: bit-identical on every path.
    np.testing.assert_array_equal(got_w, want_w)
    np.testing.assert_array_equal(got_acc, want_acc)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("z0,zs", [(0, 3), (5, 4), (13, 4), (16, 1)])
def test_accumulate_slab_clips_rows(rng, path, z0, zs):
    vol, patch = (17, 23, 19), (8, 10, 6)
    got_acc, got_w, want_acc, want_w = run_accumulate(rng, path, vol, patch, 0.5, 3, np.float32, np.float32, z0, zs)
    np.testing.assert_array_equal(got_w, want_w)
    np.testing.assert_array_equal(got_acc, want_acc)


@pytest.mark.parametrize("path", PATHS)
def test_accumulate_float16_accumulator(rng, path):
    got_acc, got_w, want_acc, want_w = run_accumulate(
        rng, path, (17, 23, 19), (8, 10, 6), 0.5, 2, np.float16, np.float16, 0, 17
    )
    np.testing.assert_array_equal(got_w, want_w)
    np.testing.assert_allclose(got_acc.astype(np.float32), want_acc.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_accumulate_more_windows_than_one_launch(rng):
    # 300 windows: the CUDA path splits a batch into launches of 128 (ops/stitch_math.h).
    vol, patch = (6, 40, 40), (4, 6, 6)
    origins = rng.integers(-3, 38, size=(300, 3))
    origins[:, 0] = rng.integers(-2, 5, size=300)
    patches = rng.standard_normal((300, 2, *patch), dtype=np.float32)
    imp = np.ascontiguousarray(gaussian_importance(patch))
    want_acc, want_w = np.zeros((2, *vol), np.float32), np.zeros(vol, np.float32)
    reference.accumulate(want_acc, want_w, patches, origins, imp)
    for algorithm in ("blocked", "gather"):
        acc, wsum = np.zeros_like(want_acc), np.zeros_like(want_w)
        native.accumulate(acc, wsum, patches, origins, imp, algorithm=algorithm)
        np.testing.assert_array_equal(wsum, want_w)
        np.testing.assert_array_equal(acc, want_acc)


@pytest.mark.parametrize("path", PATHS)
def test_accumulate_empty_batch_is_noop(path):
    acc = to_device(np.ones((2, 3, 4, 5), np.float32), path)
    wsum = to_device(np.ones((3, 4, 5), np.float32), path)
    patches = to_device(np.zeros((0, 2, 2, 2, 2), np.float32), path)
    native.accumulate(
        acc,
        wsum,
        patches,
        np.zeros((0, 3), np.int64),
        to_device(np.ones((2, 2, 2), np.float32), path),
        **algo(path, "accumulate"),
    )
    assert (to_numpy(acc) == 1).all() and (to_numpy(wsum) == 1).all()


def random_blend(rng, channels, shape=(6, 9, 11), zero_weight=True, nonfinite=True):
    acc = rng.standard_normal((channels, *shape), dtype=np.float32) * 3
    wsum = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if zero_weight:
        wsum[0, 0, :3] = 0
    if nonfinite:
        acc[0, 1, 1, 1] = np.nan
        acc[-1, 2, 2, 2] = np.inf
    return acc, wsum


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("channels", [1, 2, 3, 105, 300])
@pytest.mark.parametrize("kind", ["logits", "probabilities"])
@pytest.mark.parametrize("threshold", [0.0, 0.4, 0.9])
def test_finalize_matches_reference(rng, path, channels, kind, threshold):
    acc, wsum = random_blend(rng, channels)
    if kind == "probabilities":
        u = rng.uniform(0.01, 1.0, acc.shape).astype(np.float32)
        probs = u / u.sum(axis=0, keepdims=True) if channels > 1 else u
        acc = (probs * wsum[None]).astype(np.float32)
        acc[0, 1, 1, 1] = np.nan
    ignore = 255 if channels <= 255 else 1000
    got = native.finalize(
        to_device(acc, path), to_device(wsum, path), threshold, ignore, kind, **algo(path, "finalize")
    )
    labels, conf, counts = reference.finalize(acc, wsum, threshold, ignore, kind)
    k = max(channels, 2)
    got_labels, got_conf = to_numpy(got.labels), to_numpy(got.confidence)
    assert got_labels.dtype == labels.dtype == (np.uint8 if channels <= 255 else np.uint16)
    # Our exp polynomial is within 2 ulp of NumPy's exp: allow disagreement only where the
    # probability sits on the threshold or on a rounding edge of the 0..255 confidence scale.
    close = np.abs(conf.astype(int) - got_conf.astype(int)) <= 1
    assert close.all()
    same = got_labels == labels
    assert same.mean() >= 0.999, same.mean()
    assert abs(got.ignored - counts[k]) <= (~same).sum()
    assert got.invalid == counts[k + 1] == int((labels == ignore).sum() - counts[k])
    assert got.counts.sum() + got.ignored + got.invalid == wsum.size


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [(0, 6), (2, 5), (3, 3), (5, 6)])
def test_finalize_rows_match_reference_of_those_rows(rng, path, rows):
    acc, wsum = random_blend(rng, 4)
    got = native.finalize(
        to_device(acc, path), to_device(wsum, path), 0.4, 255, "probabilities", rows=rows, **algo(path, "finalize")
    )
    r0, r1 = rows
    labels, conf, counts = reference.finalize(acc[:, r0:r1], wsum[r0:r1], 0.4, 255, "probabilities")
    # probabilities need no exp: exact against the reference
    np.testing.assert_array_equal(to_numpy(got.labels), labels)
    np.testing.assert_array_equal(to_numpy(got.confidence), conf)
    assert got.counts.tolist() == counts[:-2].tolist() and [got.ignored, got.invalid] == counts[-2:].tolist()


@pytest.mark.parametrize("path", PATHS)
def test_constant_windows_give_constant_back(path):
    vol, patch, channels = (13, 17, 15), (8, 8, 8), 4
    probs = np.array([0.125, 0.125, 0.75, 0.0], np.float32)
    origins = sliding_window_origins(vol, patch, 0.5)
    patches = np.broadcast_to(probs[None, :, None, None, None], (len(origins), channels, *patch)).copy()
    acc = to_device(np.zeros((channels, *vol), np.float32), path)
    wsum = to_device(np.zeros(vol, np.float32), path)
    imp = to_device(np.ascontiguousarray(gaussian_importance(patch)), path)
    native.accumulate(acc, wsum, to_device(patches, path), origins, imp, **algo(path, "accumulate"))
    blended = to_numpy(acc) / to_numpy(wsum)[None]
    np.testing.assert_allclose(blended, np.broadcast_to(probs[:, None, None, None], blended.shape), atol=1e-6)
    out = native.finalize(acc, wsum, threshold=0.7, ignore_index=255, kind="probabilities", **algo(path, "finalize"))
    assert (to_numpy(out.labels) == 2).all()
    assert (to_numpy(out.confidence) == 191).all()  # floor(0.75 * 255 + 0.5)
    assert out.counts.tolist() == [0, 0, int(np.prod(vol)), 0] and out.ignored == out.invalid == 0


@pytest.mark.parametrize("path", PATHS)
def test_finalize_ties_and_threshold_edges(path):
    # voxel 0: tie -> lowest index; voxel 1: p == threshold kept; voxel 2: just below -> ignored;
    # voxel 3: zero weight -> invalid.
    acc = np.array([[0.5, 0.5, 0.5, 0.9], [0.5, 0.25, 0.25, 0.1], [0.0, 0.25, 0.25, 0.0]], np.float32)
    acc[:, 2] = [0.49999997, 0.25, 0.25000003]
    wsum = np.array([1, 1, 1, 0], np.float32)
    out = native.finalize(
        to_device(acc.reshape(3, 1, 1, 4), path),
        to_device(wsum.reshape(1, 1, 4), path),
        threshold=0.5,
        ignore_index=7,
        kind="probabilities",
        **algo(path, "finalize"),
    )
    assert to_numpy(out.labels).ravel().tolist() == [0, 0, 7, 7]
    assert to_numpy(out.confidence).ravel().tolist() == [128, 128, 127, 0]
    assert out.counts.tolist() == [2, 0, 0] and out.ignored == 1 and out.invalid == 1


@pytest.mark.parametrize("path", PATHS)
def test_finalize_single_channel_sigmoid(path):
    logits = np.array([0.0, 2.0, -2.0, 40.0], np.float32).reshape(1, 1, 1, 4)
    wsum = np.ones((1, 1, 4), np.float32)
    out = native.finalize(to_device(logits, path), to_device(wsum, path), kind="logits", **algo(path, "finalize"))
    assert to_numpy(out.labels).ravel().tolist() == [0, 1, 0, 1]  # p = 0.5 is a tie -> background
    p = 1 / (1 + np.exp(-2.0))
    assert to_numpy(out.confidence).ravel().tolist() == [
        128,
        int(np.floor(p * 255 + 0.5)),
        int(np.floor(p * 255 + 0.5)),
        255,
    ]
    assert out.counts.tolist() == [2, 2]


def test_torch_cpu_tensors_are_used_in_place():
    torch = pytest.importorskip("torch")
    acc = torch.zeros((1, 4, 4, 4))
    wsum = torch.zeros((4, 4, 4))
    native.accumulate(acc, wsum, torch.ones((1, 1, 4, 4, 4)), [[0, 0, 0]], torch.full((4, 4, 4), 2.0))
    assert float(acc.sum()) == 2.0 * 64 and float(wsum.sum()) == 2.0 * 64


@pytest.mark.parametrize("path", ["blocked", "gather"])
def test_bfloat16_patches_add_as_their_exact_float32_values(rng, path):
    """bfloat16 -> float32 is exact, so bf16 patches (NumPy via ml_dtypes, or torch) give the
    very sums of their float32 copy; an accumulator stays float32/float16."""
    torch = pytest.importorskip("torch")
    patches = (rng.standard_normal((3, 2, 5, 6, 7), dtype=np.float32) * 50).astype(BF16)
    origins, imp = [[0, 0, 0], [2, 3, -1], [-1, 4, 5]], np.ascontiguousarray(gaussian_importance((5, 6, 7)))
    results = []
    for p in (patches.astype(np.float32), patches, torch.from_numpy(patches.view(np.uint16)).view(torch.bfloat16)):
        acc, wsum = np.zeros((2, 8, 9, 10), np.float32), np.zeros((8, 9, 10), np.float32)
        native.accumulate(acc, wsum, p, origins, imp, algorithm=path)
        results.append((acc, wsum))
    for acc, wsum in results[1:]:
        np.testing.assert_array_equal(acc, results[0][0])
        np.testing.assert_array_equal(wsum, results[0][1])
    with pytest.raises(ValueError, match="acc must have dtype float32 or float16, got numpy bfloat16"):
        native.accumulate(np.zeros((2, 8, 9, 10), BF16), wsum, patches, origins, imp, algorithm=path)


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: native.accumulate(
                np.zeros((1, 4, 4, 4), np.float64),
                np.zeros((4, 4, 4), np.float32),
                np.zeros((1, 1, 2, 2, 2), np.float32),
                [[0, 0, 0]],
                np.ones((2, 2, 2), np.float32),
            ),
            "acc must have dtype float32 or float16, got numpy float64",
        ),
        (
            lambda: native.accumulate(
                np.zeros((1, 4, 4, 4), np.float32),
                np.zeros((4, 4, 5), np.float32),
                np.zeros((1, 1, 2, 2, 2), np.float32),
                [[0, 0, 0]],
                np.ones((2, 2, 2), np.float32),
            ),
            r"wsum must have shape \(4, 4, 4\)",
        ),
        (
            lambda: native.accumulate(
                np.zeros((2, 4, 4, 4), np.float32),
                np.zeros((4, 4, 4), np.float32),
                np.zeros((1, 1, 2, 2, 2), np.float32),
                [[0, 0, 0]],
                np.ones((2, 2, 2), np.float32),
            ),
            "patches must have 2 channels",
        ),
        (
            lambda: native.accumulate(
                np.zeros((1, 4, 4, 4), np.float32),
                np.zeros((4, 4, 4), np.float32),
                np.zeros((1, 1, 2, 2, 2), np.float32),
                [[0, 0]],
                np.ones((2, 2, 2), np.float32),
            ),
            r"origins must have shape \(1, 3\)",
        ),
        (
            lambda: native.accumulate(
                np.zeros((1, 4, 4, 8), np.float32)[..., ::2],
                np.zeros((4, 4, 4), np.float32),
                np.zeros((1, 1, 2, 2, 2), np.float32),
                [[0, 0, 0]],
                np.ones((2, 2, 2), np.float32),
            ),
            "acc must be C-contiguous",
        ),
        (
            lambda: native.finalize(np.zeros((3, 2, 2, 2), np.float32), np.ones((2, 2, 2), np.float32), ignore_index=2),
            r"ignore_index must be in \[3, 65535\]",
        ),
        (
            lambda: native.finalize(np.zeros((3, 2, 2, 2), np.float32), np.ones((2, 2, 2), np.float32), threshold=1.5),
            r"threshold must be in \[0, 1\]",
        ),
        (
            lambda: native.finalize(np.zeros((3, 2, 2, 2), np.float32), np.ones((2, 2, 2), np.float32), kind="softmax"),
            "kind must be",
        ),
        (
            lambda: native.extract_patches(np.zeros((4, 4), np.float32), [[0, 0, 0]], (2, 2, 2)),
            r"volume must be \(Z, Y, X\) or \(M, Z, Y, X\)",
        ),
        (lambda: native.extract_patches([[1.0]], [[0, 0, 0]], (2, 2, 2)), "volume must be a numpy array"),
        (
            lambda: native.extract_patches(np.zeros((4, 4, 4)), [[0, 0, 0]], (2, 2, 2)),
            r"volume must have dtype float32, got numpy float64 array of shape \(4, 4, 4\) on cpu",
        ),
        (
            lambda: native.extract_patches(np.zeros((4, 4, 4), np.float32), [[0, 0, 0]], (2, 2)),
            r"patch_size must be three positive integers, got \(2, 2\)",
        ),
        (
            lambda: native.extract_patches(np.zeros((4, 4, 4), np.float32), [[0, 0, 0]], (2, 2, 2), out_dtype="int8"),
            "out_dtype must be float32 or float16, got 'int8'",
        ),
        (
            lambda: native.extract_patches(
                np.zeros((4, 4, 4), np.float32), [[0, 0, 0]], (2, 2, 2), out=np.zeros((1, 1, 2, 2, 3), np.float32)
            ),
            r"out must have shape \(1, 1, 2, 2, 2\), got numpy float32 array of shape \(1, 1, 2, 2, 3\)",
        ),
        (
            lambda: native.extract_patches(np.zeros((4, 4, 4), np.float32), [[0, 0, 0]], (2, 2, 2), algorithm="gather"),
            "algorithm must be 'auto', 'rows' or 'element', got 'gather'",
        ),
        (
            lambda: native.accumulate(
                np.zeros((1, 4, 4, 4), np.float32),
                np.zeros((4, 4, 4), np.float32),
                np.zeros((1, 1, 2, 2, 2), np.float32),
                [[0, 0, 2**40]],
                np.ones((2, 2, 2), np.float32),
            ),
            r"origins must lie within \+-2\*\*30 voxels",
        ),
        (
            lambda: native.accumulate(
                np.zeros((1, 4, 4, 4), np.float32),
                np.zeros((4, 4, 4), np.float32),
                np.zeros((1, 1, 2, 2, 2), np.float32),
                [[0, 0, 0]],
                np.ones((2, 2, 3), np.float32),
            ),
            r"importance must have the window shape \(2, 2, 2\), got numpy float32 array of shape \(2, 2, 3\)",
        ),
        (
            lambda: native.accumulate(
                np.zeros((1, 4, 4, 4), np.float32),
                np.zeros((4, 4, 4), np.float32),
                np.zeros((1, 1, 2, 2, 2), np.float32),
                [[0, 0, 0]],
                np.ones((2, 2, 2), np.float32),
                algorithm="voxel",
            ),
            "algorithm must be 'auto', 'blocked' or 'gather', got 'voxel'",
        ),
        (
            lambda: native.accumulate(
                np.zeros((1, 4, 4, 4), np.float32),
                np.zeros((4, 4, 4), np.float32),
                np.zeros((1, 1, 2, 2, 2), np.float32),
                "abc",
                np.ones((2, 2, 2), np.float32),
            ),
            "origins must be",
        ),
        (
            lambda: native.accumulate(
                np.broadcast_to(np.float32(0), (1, 4, 4, 4)),
                np.zeros((4, 4, 4), np.float32),
                np.zeros((1, 1, 2, 2, 2), np.float32),
                [[0, 0, 0]],
                np.ones((2, 2, 2), np.float32),
            ),
            "acc must be C-contiguous",
        ),
        (
            lambda: native.accumulate(
                _read_only(np.zeros((1, 4, 4, 4), np.float32)),
                np.zeros((4, 4, 4), np.float32),
                np.zeros((1, 1, 2, 2, 2), np.float32),
                [[0, 0, 0]],
                np.ones((2, 2, 2), np.float32),
            ),
            r"acc must be writeable, got a read-only numpy float32 array of shape \(1, 4, 4, 4\) on cpu",
        ),
        (
            lambda: native.finalize(np.zeros((3, 2, 2, 2), np.float32), np.ones((2, 2, 2), np.float32), rows=(1, 3)),
            r"rows must satisfy 0 <= start <= end <= 2, got \(1, 3\)",
        ),
        (
            lambda: native.finalize(np.zeros((3, 2, 2, 2), np.float32), np.ones((2, 2, 3), np.float32)),
            r"wsum must have shape \(2, 2, 2\), got numpy float32 array of shape \(2, 2, 3\) on cpu",
        ),
        (
            lambda: native.finalize(np.zeros((0, 2, 2, 2), np.float32), np.ones((2, 2, 2), np.float32)),
            "acc must have at least one channel",
        ),
        (
            lambda: native.finalize(
                np.zeros((3, 2, 2, 2), np.float32), np.ones((2, 2, 2), np.float32), algorithm="gather"
            ),
            "algorithm must be 'auto', 'blocked' or 'voxel', got 'gather'",
        ),
        (
            lambda: native.finalize(np.zeros((3, 2, 2, 2), np.float32), np.ones((2, 2, 2), np.float32), kind=None),
            "kind must be a string, got None",
        ),
        (
            lambda: native.finalize(
                np.zeros((3, 2, 2, 2), np.float32), np.ones((2, 2, 2), np.float32), threshold="high"
            ),
            "threshold must be a number, got 'high'",
        ),
        (
            lambda: native.accumulate(
                np.zeros((1, 4, 4, 4), np.float32),
                np.zeros((4, 4, 4), np.float32),
                np.zeros((1, 1, 2, 2, 2), np.float32),
                [[0, 0, 0]],
                np.ones((2, 2, 2), np.float32),
                z0=None,
            ),
            "z0 must be an integer, got None",
        ),
        # declared arguments (csrc/*.h tables): parsed and checked by the table's parser or rule
        (
            lambda: native.extract_patches(np.zeros((4, 4, 4), np.float32), [[0, 0, 0]], (2, 2, 2), pad_value="x"),
            "pad_value must be a number, got 'x'",
        ),
        (
            lambda: native.accumulate(
                np.zeros((1, 4, 4, 4), np.float32),
                np.zeros((4, 4, 4), np.float32),
                np.zeros((1, 1, 2, 2, 2), np.float32),
                [[0, 0, 0]],
                np.ones((2, 2, 2), np.float64),
            ),
            r"importance must have dtype float32, got numpy float64 array of shape \(2, 2, 2\) on cpu",
        ),
        (
            lambda: native.accumulate(
                np.zeros((1, 4, 4, 4), np.float32),
                np.zeros((4, 4, 4), np.float32),
                np.zeros((1, 1, 2, 2, 2), np.float32),
                [[0, 0, 0]],
                np.ones((2, 2), np.float32),
            ),
            r"importance must have 3 dimensions, got numpy float32 array of shape \(2, 2\)",
        ),
        (
            lambda: native.finalize(np.zeros((3, 4, 2, 2), np.float32), np.ones((4, 2, 2), np.float64), rows=(1, 3)),
            r"wsum must have dtype float32, got numpy float64 array of shape \(4, 2, 2\)",
        ),
        (
            lambda: native.finalize(np.zeros((3, 4, 2, 2), np.float32), np.ones((3, 2, 2), np.float32), rows=(1, 3)),
            r"wsum must have shape \(4, 2, 2\), got numpy float32 array of shape \(3, 2, 2\)",
        ),
    ],
)
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def test_torch_arguments_are_described_by_torch():
    torch = pytest.importorskip("torch")
    with pytest.raises(
        ValueError,
        match=r"volume must have dtype float32, got torch bfloat16 array of shape "
        r"\(3, 4, 5\) on cpu",
    ):
        native.extract_patches(torch.zeros((3, 4, 5), dtype=torch.bfloat16), [[0, 0, 0]], (2, 2, 2))
    with pytest.raises(ValueError, match=r"wsum must be C-contiguous .* got a strided torch float32 array"):
        native.finalize(torch.zeros((2, 3, 4, 5)), torch.ones((5, 4, 3)).permute(2, 1, 0))


class FakeCudaArray:
    """Claims to be a CUDA float32 array (``__cuda_array_interface__``) with no memory behind it."""

    def __init__(self, shape):
        self.__cuda_array_interface__ = {
            "shape": tuple(shape),
            "typestr": "<f4",
            "data": (0, False),
            "strides": None,
            "version": 3,
        }


@pytest.mark.skipif(native.has_cuda(), reason="a GPU is visible: a fake CUDA array would reach the driver")
def test_cuda_arrays_without_a_gpu_fail_loudly():
    loud = "CUDA arrays were passed but (atso_fast._C was built without CUDA|no CUDA device is visible)"
    acc, wsum = FakeCudaArray((1, 4, 4, 4)), FakeCudaArray((4, 4, 4))
    with pytest.raises(RuntimeError, match=loud):
        native.accumulate(acc, wsum, FakeCudaArray((1, 1, 2, 2, 2)), [[0, 0, 0]], FakeCudaArray((2, 2, 2)))
    with pytest.raises(RuntimeError, match=loud):
        native.finalize(acc, wsum)
    with pytest.raises(RuntimeError, match=loud):
        native.probabilities(acc, wsum)
    with pytest.raises(RuntimeError, match=loud):
        native.extract_patches(wsum, [[0, 0, 0]], (2, 2, 2))
    with pytest.raises(
        ValueError,
        match="arrays must all be on the host or all on one CUDA device; got acc: "
        r"test_kernels float32 array of shape \(1, 4, 4, 4\) on cuda:-1, wsum: numpy",
    ):
        native.finalize(acc, np.ones((4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="arrays must all be on the host or all on one CUDA device; got acc: "):
        native.probabilities(acc, np.ones((4, 4, 4), np.float32))


@pytest.mark.cuda
def test_cuda_arrays_refuse_the_host_algorithm():
    torch = pytest.importorskip("torch")
    acc, wsum = torch.zeros((2, 3, 4, 5), device="cuda"), torch.ones((3, 4, 5), device="cuda")
    with pytest.raises(ValueError, match="algorithm 'blocked' is the host kernel; CUDA arrays run 'auto' or 'voxel'"):
        native.finalize(acc, wsum, algorithm="blocked")


@pytest.mark.parametrize("kernel", ["extract_patches", "accumulate", "finalize", "probabilities", "resample_finalize"])
def test_binding_docstrings_list_the_wrappers_arguments(kernel):
    """The binding's argument list (declared arguments generated from the kernel's header) names
    exactly the Python wrapper's parameters."""
    from atso_fast import _C

    listed = re.search(kernel + r"\(\*, ([^)]*)\)", getattr(_C, kernel).__doc__).group(1).split(", ")
    assert sorted(listed) == sorted(inspect.signature(getattr(native, kernel)).parameters)


def test_build_info_reports_build():
    info = native.build_info()
    assert info["native"] is True
    # the build machines and CI compile with OpenMP (gcc); a build that lost it must fail here
    assert isinstance(info["cuda"], bool) and info["openmp"] is True and info["omp_max_threads"] >= 1
    if not info["cuda"]:
        assert not native.has_cuda()


def test_gaussian_matches_monai():
    monai_utils = pytest.importorskip("monai.data.utils")
    for patch in [(96, 96, 96), (5, 7, 1), (3, 4, 8), (1, 64, 64)]:
        want = monai_utils.compute_importance_map(patch, mode="gaussian", sigma_scale=0.125, device="cpu").numpy()
        np.testing.assert_allclose(gaussian_importance(patch), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="patch_size must be positive"):
        gaussian_importance((0, 4, 4))


def _specials(a: np.ndarray, rng) -> np.ndarray:
    """Sprinkle float16 specials into ``a`` (bfloat16 ones into a bfloat16 ``a``): NaNs with
    payloads, infs, subnormals, near-max values."""
    if a.dtype == BF16:
        specials = np.array(
            [0x7FC0, 0xFFC1, 0x7F81, 0x7FD5, 0x7F80, 0xFF80, 0x0001, 0x807F, 0x7F7F, 0xFF7E], np.uint16
        ).view(BF16)
    else:
        specials = np.array(
            [0x7E00, 0xFE01, 0x7C01, 0x7D55, 0x7C00, 0xFC00, 0x0001, 0x83FF, 0x7BFF, 0xFBFE], np.uint16
        ).view(np.float16)
    flat = a.reshape(-1)
    idx = rng.choice(flat.size, size=min(flat.size, 200), replace=False)
    flat[idx] = specials[rng.integers(0, len(specials), len(idx))].astype(a.dtype)
    return a


@pytest.mark.parametrize("channels", [1, 3, 105])
@pytest.mark.parametrize("acc_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("patch_dtype", [np.float16, BF16])
def test_cpu_isa_builds_agree_bit_for_bit(rng, channels, acc_dtype, patch_dtype):
    from atso_fast import _C

    if native.build_info().get("cpu_isa") != "avx2":
        pytest.skip("this CPU or build has only the generic kernels")
    vol, patch = (17, 23, 19), (8, 10, 6)
    origins = np.concatenate([sliding_window_origins(vol, patch, 0.5), corner_origins(vol, patch)])
    data = np.random.default_rng(1).standard_normal((len(origins), channels, *patch), dtype=np.float32)
    patches = _specials(data.astype(patch_dtype), np.random.default_rng(2))
    start = _specials(
        np.random.default_rng(3).standard_normal((channels, *vol)).astype(acc_dtype), np.random.default_rng(4)
    )
    imp = np.ascontiguousarray(gaussian_importance(patch))
    results = []
    for isa in ("generic", "auto"):
        assert _C.set_cpu_isa(isa)
        try:
            acc, wsum = start.copy(), np.zeros(vol, np.float32)
            native.accumulate(acc, wsum, patches, origins, imp, 0)
            results.append((acc.view(np.uint16 if acc_dtype == np.float16 else np.uint32), wsum))
        finally:
            _C.set_cpu_isa("auto")
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    results = []
    for isa in ("generic", "auto"):
        assert _C.set_cpu_isa(isa)
        try:
            got_acc, got_w, _, _ = run_accumulate(
                np.random.default_rng(1), "cpu", vol, patch, 0.5, channels, patch_dtype, acc_dtype, 0, vol[0]
            )
            fin = native.finalize(got_acc, got_w, 0.3, 255, "logits")
            results.append((got_acc, got_w, fin.labels, fin.confidence, fin.counts))
        finally:
            _C.set_cpu_isa("auto")
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_kernel_threads_scope_and_determinism(rng):
    from atso_fast import _C

    vol, patch = (17, 23, 19), (8, 10, 6)
    runs = []
    for n in (1, 2, None):
        with native.kernel_threads(n):
            assert _C.kernel_threads() == (n or _C.build_info()["omp_max_threads"])
            acc, w, _, _ = run_accumulate(
                np.random.default_rng(5), "cpu", vol, patch, 0.5, 3, np.float32, np.float32, 0, vol[0]
            )
            fin = native.finalize(acc, w, 0.3, 255, "logits")
        runs.append((acc, w, fin.labels, fin.confidence, fin.counts))
    assert _C.kernel_threads() == _C.build_info()["omp_max_threads"]  # restored
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)  # same bits whatever the thread count
    with pytest.raises(ValueError, match="kernel threads must be >= 0"):
        with native.kernel_threads(-1):
            pass


def _bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of a float array (so NaN payloads and signed zeros count too)."""
    return a.view({2: np.uint16, 4: np.uint32}[a.itemsize]) if a.dtype.kind == "f" else a


def assert_same_floats(a: np.ndarray, b: np.ndarray) -> None:
    """Same bits everywhere except NaN payloads: which NaN an operation returns depends on the
    operand order the compiler picks (x86 returns the first operand's), the GPU returns its
    canonical NaN, so only NaN-ness is part of the contract."""
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    np.testing.assert_array_equal(nan_a, nan_b)
    np.testing.assert_array_equal(
        _bits(np.where(nan_a, 0, a).astype(a.dtype)), _bits(np.where(nan_b, 0, b).astype(b.dtype))
    )


def _special_start(channels, vol, acc_dtype):
    """Accumulator start values with float16 specials: NaN payloads, infs, subnormals, near-max."""
    start = np.random.default_rng(3).standard_normal((channels, *vol)).astype(acc_dtype)
    return _specials(start, np.random.default_rng(4))


def _run_both(call):
    """``call(algorithm)`` with the blocked CPU kernel and with the host build of the CUDA path."""
    return [call(a) for a in ("blocked", "thread")]


@pytest.mark.parametrize("vol,patch,overlap", GRIDS)
@pytest.mark.parametrize("channels", [1, 3, 105])
@pytest.mark.parametrize(
    "acc_dtype,patch_dtype",
    [
        (np.float32, np.float32),
        (np.float32, np.float16),
        (np.float16, np.float32),
        (np.float16, np.float16),
        (np.float32, BF16),
        (np.float16, BF16),
    ],
)
def test_accumulate_blocked_and_gather_agree_bit_for_bit(vol, patch, overlap, channels, acc_dtype, patch_dtype):
    origins = np.concatenate([sliding_window_origins(vol, patch, overlap), corner_origins(vol, patch)])
    data = np.random.default_rng(1).standard_normal((len(origins), channels, *patch), dtype=np.float32) * 4
    patches = _specials(data.astype(patch_dtype), np.random.default_rng(2))
    imp = np.ascontiguousarray(gaussian_importance(patch))
    z0, zs = min(1, vol[0] - 1), max(vol[0] - 2, 1)  # a slab that starts below row 0
    start = _special_start(channels, (zs, *vol[1:]), acc_dtype)

    def call(algorithm):
        acc, wsum = start.copy(), np.zeros((zs, *vol[1:]), np.float32)
        native.accumulate(
            acc, wsum, patches, origins, imp, z0, algorithm={"thread": "gather"}.get(algorithm, algorithm)
        )
        return acc, wsum

    (acc_a, w_a), (acc_b, w_b) = _run_both(call)
    assert_same_floats(w_a, w_b)
    assert_same_floats(acc_a, acc_b)


@pytest.mark.parametrize("channels", [1, 2, 3, 105, 300])
@pytest.mark.parametrize("kind", ["logits", "probabilities"])
@pytest.mark.parametrize("threshold", [0.0, 0.4, 0.9])
@pytest.mark.parametrize("acc_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("rows", [None, (2, 5)])
def test_finalize_blocked_and_voxel_agree_bit_for_bit(rng, channels, kind, threshold, acc_dtype, rows):
    acc, wsum = random_blend(rng, channels)
    acc[:, 3] *= 40  # large logits: probabilities near 1, exp near its clamp
    acc[1 % channels, 4, 4, :4] = acc[0, 4, 4, :4]  # ties between channel 0 and 1
    acc = acc.astype(acc_dtype)
    wsum[3, 1, 1], wsum[4, 2, 2] = np.inf, np.nan
    ignore = 255 if channels <= 255 else 1000

    def call(algorithm):
        out = native.finalize(
            acc, wsum, threshold, ignore, kind, rows=rows, algorithm={"thread": "voxel"}.get(algorithm, algorithm)
        )
        return out.labels, out.confidence, out.counts, out.ignored, out.invalid

    blocked, voxel = _run_both(call)
    for a, b in zip(blocked, voxel):
        np.testing.assert_array_equal(a, b)
    assert blocked[4] >= (3 if rows else 7)  # the zero, inf and NaN weights and values were seen


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
def test_extract_patches_rows_and_element_agree_bit_for_bit(out_dtype):
    vol, patch = (9, 31, 12), (4, 16, 16)
    volume = _specials(np.random.default_rng(6).standard_normal((2, *vol), dtype=np.float32), np.random.default_rng(7))
    volume.reshape(-1)[:4] = np.array([0x7FC12345, 0xFF812345, 0x33000001, 0x477FEFFF], np.uint32).view(np.float32)
    origins = np.concatenate([sliding_window_origins(vol, patch, 0.75), corner_origins(vol, patch)])
    got = [
        native.extract_patches(volume, origins, patch, pad_value=np.nan, out_dtype=out_dtype, algorithm=a)
        for a in ("rows", "element")
    ]
    np.testing.assert_array_equal(_bits(got[0]), _bits(got[1]))


@pytest.mark.cuda
@pytest.mark.parametrize("channels", [1, 3, 105])
@pytest.mark.parametrize(
    "acc_dtype,patch_dtype",
    [(np.float32, np.float32), (np.float32, np.float16), (np.float16, np.float16), (np.float32, BF16)],
)
def test_cuda_matches_cpu_bit_for_bit(channels, acc_dtype, patch_dtype):
    torch = pytest.importorskip("torch")
    vol, patch = (17, 23, 19), (8, 10, 6)
    origins = np.concatenate([sliding_window_origins(vol, patch, 0.5), corner_origins(vol, patch)])
    data = np.random.default_rng(1).standard_normal((len(origins), channels, *patch), dtype=np.float32) * 4
    patches = _specials(data.astype(patch_dtype), np.random.default_rng(2))
    imp = np.ascontiguousarray(gaussian_importance(patch))
    start = _special_start(channels, vol, acc_dtype)
    acc, wsum = start.copy(), np.zeros(vol, np.float32)
    native.accumulate(acc, wsum, patches, origins, imp)
    acc_d, wsum_d = torch.from_numpy(start).cuda(), torch.zeros(vol, device="cuda")
    native.accumulate(acc_d, wsum_d, to_device(patches, "cuda"), origins, torch.from_numpy(imp).cuda())
    assert_same_floats(to_numpy(acc_d), acc)
    assert_same_floats(to_numpy(wsum_d), wsum)
    for kind in ("logits", "probabilities"):
        host = native.finalize(acc, wsum, 0.3, 255, kind, rows=(2, 15))
        dev = native.finalize(acc_d, wsum_d, 0.3, 255, kind, rows=(2, 15))
        np.testing.assert_array_equal(to_numpy(dev.labels), host.labels)
        np.testing.assert_array_equal(to_numpy(dev.confidence), host.confidence)
        assert dev.counts.tolist() == host.counts.tolist()
        assert (dev.ignored, dev.invalid) == (host.ignored, host.invalid)
    volume = _specials(np.random.default_rng(6).standard_normal((2, *vol), dtype=np.float32), np.random.default_rng(7))
    for out_dtype in ("float32", "float16"):  # a pure conversion: the same bits, NaN payloads included
        host = native.extract_patches(volume, origins, patch, pad_value=-1.5, out_dtype=out_dtype)
        dev = native.extract_patches(
            torch.from_numpy(volume).cuda(), origins, patch, pad_value=-1.5, out_dtype=out_dtype
        )
        np.testing.assert_array_equal(_bits(to_numpy(dev)), _bits(host))


@pytest.mark.cuda
def test_cuda_accumulate_over_128_windows_matches_cpu():
    """More windows than one launch takes (ops/stitch_math.h kMaxWindows = 128): the launch split."""
    torch = pytest.importorskip("torch")
    vol, patch = (20, 21, 22), (4, 5, 6)
    rng = np.random.default_rng(11)
    origins = np.stack([rng.integers(-2, n - p + 3, size=300) for n, p in zip(vol, patch)], axis=1).astype(np.int64)
    patches = rng.standard_normal((len(origins), 3, *patch), dtype=np.float32)
    imp = np.ascontiguousarray(gaussian_importance(patch))
    acc, wsum = np.zeros((3, *vol), np.float32), np.zeros(vol, np.float32)
    native.accumulate(acc, wsum, patches, origins, imp)
    acc_d, wsum_d = torch.zeros((3, *vol), device="cuda"), torch.zeros(vol, device="cuda")
    native.accumulate(acc_d, wsum_d, torch.from_numpy(patches).cuda(), origins, torch.from_numpy(imp).cuda())
    assert_same_floats(to_numpy(acc_d), acc)
    assert_same_floats(to_numpy(wsum_d), wsum)


@pytest.mark.cuda
def test_cuda_finalize_past_the_shared_histogram_matches_cpu():
    """More classes than the per-block shared histogram holds (finalize_cuda.cu kSharedBins = 2048):
    the global-atomics branch, with uint16 labels."""
    torch = pytest.importorskip("torch")
    channels, vol = 2100, (2, 3, 4)
    acc = np.random.default_rng(12).standard_normal((channels, *vol), dtype=np.float32) * 3
    wsum = np.ones(vol, np.float32)
    for kind in ("logits", "probabilities"):
        host = native.finalize(acc, wsum, 0.0, 65535, kind)
        dev = native.finalize(torch.from_numpy(acc).cuda(), torch.from_numpy(wsum).cuda(), 0.0, 65535, kind)
        assert host.labels.dtype == np.uint16
        np.testing.assert_array_equal(to_numpy(dev.labels), host.labels)
        np.testing.assert_array_equal(to_numpy(dev.confidence), host.confidence)
        assert dev.counts.tolist() == host.counts.tolist()
