"""``native.probabilities``: finalize's per-channel softmax (sigmoid for one channel).

Against the NumPy reference, against ``native.finalize`` itself (its labels hold the largest
probability, its confidence is that probability x 255, rounded), hand-computed answers, edge
shapes and refused arguments. Paths as in ``test_kernels.py``: ``cpu`` (the blocked CPU kernel),
``cpu-thread`` (the CUDA kernel's per-voxel body as a host loop, ``algorithm="voxel"``) and
``cuda``; the first two agree bit for bit, and so does the GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import to_numpy

from atso_fast.kernels import native, reference

PATHS = ["cpu", "cpu-thread", pytest.param("cuda", marks=pytest.mark.cuda)]
NAN_BITS = 0x7FC00000  # the one NaN an invalid voxel gets, on every path


def to_device(array: np.ndarray, path: str):
    """numpy on the host paths, a torch CUDA tensor on cuda."""
    if path != "cuda":
        return np.ascontiguousarray(array)
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).to("cuda")


def probs(acc, wsum, kind="logits", path="cpu", rows=None) -> np.ndarray:
    """``native.probabilities`` on ``path``, back on the host."""
    algorithm = "voxel" if path == "cpu-thread" else "auto"
    out = native.probabilities(to_device(acc, path), to_device(wsum, path), kind, rows=rows, algorithm=algorithm)
    return to_numpy(out)


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32)


def to_confidence(p: np.ndarray) -> np.ndarray:
    """round(p * 255) as finalize computes it: float32 product, + 0.5, floor, clamp."""
    p = np.asarray(p, np.float32)
    return np.clip(np.floor(p * np.float32(255) + np.float32(0.5)), 0, 255).astype(np.uint8)


def blend(rng, channels, shape=(6, 9, 11), acc_dtype=np.float32, kind="logits"):
    """Random blended sums with every case finalize treats specially: zero, inf and NaN weights,
    NaN and inf values, logits large enough to reach the exp clamp, exact ties."""
    wsum = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if kind == "probabilities":
        u = rng.uniform(0.01, 1.0, (channels, *shape)).astype(np.float32)
        acc = ((u / u.sum(axis=0, keepdims=True) if channels > 1 else u) * wsum[None]).astype(np.float32)
    else:
        acc = rng.standard_normal((channels, *shape), dtype=np.float32) * 3
        acc[:, 3] *= 40  # large logits: probabilities near 0 and 1, exp at its clamp
    acc[1 % channels, 4, 4, :4] = acc[0, 4, 4, :4]  # ties between channels 0 and 1
    acc[0, 1, 1, 1] = np.nan
    acc[-1, 2, 2, 2] = np.inf
    wsum[0, 0, :3] = 0
    wsum[3, 1, 1], wsum[4, 2, 2] = np.inf, np.nan
    return acc.astype(acc_dtype), wsum


def invalid_voxels(acc, wsum) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        vals = acc.astype(np.float32) / wsum[None]
    return ~(wsum > 0) | ~np.isfinite(wsum) | ~np.isfinite(vals).all(axis=0)


# ----------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("channels", [1, 2, 3, 105])
@pytest.mark.parametrize("kind", ["logits", "probabilities"])
@pytest.mark.parametrize("acc_dtype", [np.float32, np.float16])
def test_matches_reference(rng, path, channels, kind, acc_dtype):
    acc, wsum = blend(rng, channels, acc_dtype=acc_dtype, kind=kind)
    got = probs(acc, wsum, kind, path)
    want = reference.probabilities(acc, wsum, kind)
    assert got.dtype == np.float32 and got.shape == acc.shape
    bad = invalid_voxels(acc, wsum)
    assert bad.sum() >= 7  # zero, inf and NaN weights, NaN and inf values
    np.testing.assert_array_equal(np.isnan(got), np.broadcast_to(bad, got.shape))
    assert (bits(got[:, bad]) == NAN_BITS).all()
    if kind == "probabilities":  # acc / wsum, nothing else: exact
        np.testing.assert_array_equal(got, want)
        return
    # The exp polynomial is within 2 ulp of expf; NumPy's exp differs from it there, and in the
    # clamp: exp(x < -87) is exp(-87) ~ 1.6e-38 here, smaller or 0 in NumPy.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-37)
    if channels > 1:
        np.testing.assert_allclose(got[:, ~bad].sum(axis=0), 1.0, rtol=2e-6 * channels)


@pytest.mark.parametrize("channels", [1, 2, 3, 105])
@pytest.mark.parametrize("kind", ["logits", "probabilities"])
@pytest.mark.parametrize("acc_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("rows", [None, (2, 5)])
def test_blocked_and_voxel_agree_bit_for_bit(rng, channels, kind, acc_dtype, rows):
    """The blocked CPU kernel and the CUDA per-voxel body (on the host): the same bits, NaN included."""
    acc, wsum = blend(rng, channels, acc_dtype=acc_dtype, kind=kind)
    blocked = probs(acc, wsum, kind, "cpu", rows)
    voxel = probs(acc, wsum, kind, "cpu-thread", rows)
    np.testing.assert_array_equal(bits(blocked), bits(voxel))


@pytest.mark.parametrize("channels", [1, 3, 105])
@pytest.mark.parametrize("acc_dtype", [np.float32, np.float16])
def test_cpu_isa_builds_agree_bit_for_bit(rng, channels, acc_dtype):
    from atso_fast import _C

    if native.build_info().get("cpu_isa") != "avx2":
        pytest.skip("this CPU or build has only the generic kernels")
    acc, wsum = blend(rng, channels, shape=(5, 17, 23), acc_dtype=acc_dtype)
    results = []
    for isa in ("generic", "auto"):
        assert _C.set_cpu_isa(isa)
        try:
            results.append([probs(acc, wsum, kind) for kind in ("logits", "probabilities")])
        finally:
            _C.set_cpu_isa("auto")
    for a, b in zip(*results):
        np.testing.assert_array_equal(bits(a), bits(b))


# ----------------------------------------------------------------------------- finalize
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("channels", [2, 3, 105])
@pytest.mark.parametrize("kind", ["logits", "probabilities"])
@pytest.mark.parametrize("acc_dtype", [np.float32, np.float16])
def test_finalize_labels_hold_the_max_and_confidence_is_it(rng, path, channels, kind, acc_dtype):
    acc, wsum = blend(rng, channels, acc_dtype=acc_dtype, kind=kind)
    algorithm = "voxel" if path == "cpu-thread" else "auto"
    fin = native.finalize(to_device(acc, path), to_device(wsum, path), 0.0, 255, kind, rows=(1, 6), algorithm=algorithm)
    labels, confidence = to_numpy(fin.labels), to_numpy(fin.confidence)
    p = probs(acc, wsum, kind, path, rows=(1, 6))
    valid = labels != 255  # threshold 0: every ignored voxel is an invalid one
    assert fin.invalid == (~valid).sum() > 0
    assert np.isnan(p[:, ~valid]).all() and not np.isnan(p[:, valid]).any()
    pv, lv = p[:, valid], labels[valid].astype(np.int64)
    top = pv.max(axis=0)
    np.testing.assert_array_equal(np.take_along_axis(pv, lv[None], 0)[0], top)  # the label's is the max
    if kind == "probabilities":  # the values themselves: argmax is finalize's label, ties included
        np.testing.assert_array_equal(np.argmax(pv, axis=0), lv)
    else:  # logits a hair apart may share one probability (exp(-tiny) rounds to 1): where unique
        unique = (pv == top).sum(axis=0) == 1
        assert unique.mean() > 0.95
        np.testing.assert_array_equal(np.argmax(pv, axis=0)[unique], lv[unique])
    np.testing.assert_array_equal(to_confidence(top), confidence[valid])  # bit-exact: one rule
    np.testing.assert_array_equal(confidence[~valid], 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["logits", "probabilities"])
def test_one_channel_is_the_foreground_probability_finalize_decides_on(rng, path, kind):
    acc, wsum = blend(rng, 1, kind=kind)
    acc[0, 5, 0, :5] = np.array([0.0, 1e-9, -1e-9, 0.5, -0.5], np.float32) * wsum[5, 0, :5]
    fin = native.finalize(
        to_device(acc, path),
        to_device(wsum, path),
        0.0,
        255,
        kind,
        algorithm="voxel" if path == "cpu-thread" else "auto",
    )
    labels, confidence = to_numpy(fin.labels), to_numpy(fin.confidence)
    p = probs(acc, wsum, kind, path)[0]
    valid = labels != 255
    fg, bg = valid & (labels == 1), valid & (labels == 0)
    assert fg.sum() > 50 and bg.sum() > 50
    np.testing.assert_array_equal(labels[valid] == 1, p[valid] > 0.5)  # label 1 exactly where p > 0.5
    np.testing.assert_array_equal(to_confidence(p[fg]), confidence[fg])  # finalize's q itself
    other = to_confidence(np.float32(1) - p[bg]).astype(int)
    if kind == "probabilities":
        np.testing.assert_array_equal(other, confidence[bg])  # finalize's 1 - v
    else:  # finalize's 1 / (1 + e) against 1 - e / (1 + e): an ulp apart at most
        assert np.abs(other - confidence[bg].astype(int)).max() <= 1


# ----------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("path", PATHS)
def test_known_softmax_answers(path):
    # voxels: equal logits; one far above the rest (the others at the exp clamp); near float32's
    # limit (value - max overflows to -inf, clamped); a tie between the two largest
    acc = np.array(
        [[5.0, 0.0, 3e38, 7.0], [5.0, 1000.0, -3e38, 7.0], [5.0, 0.0, 0.0, -1.0], [5.0, -1000.0, 1.0, 2.0]],
        np.float32,
    ).reshape(4, 1, 1, 4)
    p = probs(acc, np.ones((1, 1, 4), np.float32), "logits", path)[:, 0, 0]
    assert np.isfinite(p).all()
    np.testing.assert_array_equal(p[:, 0], 0.25)
    assert p[1, 1] == 1.0 and p[0, 2] == 1.0
    for v, small in ((1, [0, 2, 3]), (2, [1, 2, 3])):
        assert (p[small, v] > 0).all() and (p[small, v] < 1e-37).all()
    assert p[0, 3] == p[1, 3] and p[0, 3] > p[3, 3] > p[2, 3]
    fin = native.finalize(to_device(acc, path), to_device(np.ones((1, 1, 4), np.float32), path))
    assert to_numpy(fin.labels).ravel().tolist() == [0, 1, 0, 0]


@pytest.mark.parametrize("path", PATHS)
def test_known_sigmoid_answers(path):
    v = np.array([0.0, 100.0, -100.0, 2.0, -2.0, -20.0, 3e38, -3e38], np.float32)
    p = probs(v.reshape(1, 1, 1, -1), np.ones((1, 1, v.size), np.float32), "logits", path).ravel()
    assert p[0] == 0.5 and p[1] == 1.0 and p[6] == 1.0
    assert 0 < p[2] < 1e-37 and 0 < p[7] < 1e-37  # the exp clamp, never 0 or NaN
    np.testing.assert_allclose(p[3], 1 / (1 + np.exp(-2.0)), rtol=2e-7)
    np.testing.assert_allclose(p[3] + p[4], 1.0, rtol=3e-7)
    # no cancellation: sigmoid(-20) ~ 2.06e-9 to float32 precision, not 1 - sigmoid(20) = 0
    np.testing.assert_allclose(p[5], np.exp(-20.0) / (1 + np.exp(-20.0)), rtol=1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("channels", [1, 2])
def test_invalid_voxels_are_nan_in_every_channel(path, channels):
    acc = np.ones((channels, 1, 1, 6), np.float32)
    wsum = np.array([1, 0, np.inf, np.nan, 1, 1], np.float32).reshape(1, 1, 6)
    acc[0, 0, 0, 4], acc[-1, 0, 0, 5] = np.nan, -np.inf
    for kind in ("logits", "probabilities"):
        p = probs(acc, wsum, kind, path)[:, 0, 0]
        assert not np.isnan(p[:, 0]).any()
        np.testing.assert_array_equal(bits(p[:, 1:]), NAN_BITS)


@pytest.mark.parametrize("path", PATHS)
def test_probabilities_kind_is_the_blended_values(rng, path):
    acc = rng.uniform(0, 3, (3, 2, 3, 4)).astype(np.float32)
    wsum = rng.uniform(1, 3, (2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(probs(acc, wsum, "probabilities", path), acc / wsum[None])


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "shape,rows",
    [
        ((1, 1, 1), None),  # one voxel
        ((3, 7, 13), None),  # odd sizes, a partial block
        ((2, 17, 19), (1, 2)),  # one row of a slab: 323 voxels, one block and a remainder
        ((5, 16, 16), (0, 5)),  # exactly whole blocks
        ((5, 9, 11), (3, 3)),  # no rows
        ((5, 9, 11), (2, 5)),
    ],
)
@pytest.mark.parametrize("channels", [1, 2, 7])
def test_edge_shapes_and_rows(rng, path, shape, rows, channels):
    acc = rng.standard_normal((channels, *shape), dtype=np.float32) * 4
    wsum = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    r0, r1 = rows if rows is not None else (0, shape[0])
    got = probs(acc, wsum, "logits", path, rows=rows)
    assert got.shape == (channels, r1 - r0, *shape[1:])
    np.testing.assert_array_equal(bits(got), bits(probs(acc, wsum, "logits", "cpu")[:, r0:r1]))
    np.testing.assert_allclose(got, reference.probabilities(acc[:, r0:r1], wsum[r0:r1]), rtol=1e-6, atol=1e-37)


def test_torch_cpu_tensors_in_torch_tensor_out(rng):
    torch = pytest.importorskip("torch")
    acc = rng.standard_normal((3, 2, 4, 5), dtype=np.float32)
    wsum = np.ones((2, 4, 5), np.float32)
    got = native.probabilities(torch.from_numpy(acc), torch.from_numpy(wsum), rows=(1, 2))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and tuple(got.shape) == (3, 1, 4, 5)
    np.testing.assert_array_equal(got.numpy(), native.probabilities(acc, wsum)[:, 1:2])


# ----------------------------------------------------------------------------- refusals
def _acc(shape=(3, 4, 2, 2), dtype=np.float32) -> np.ndarray:
    return np.zeros(shape, dtype)


def _wsum(shape=(4, 2, 2), dtype=np.float32) -> np.ndarray:
    return np.ones(shape, dtype)


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: native.probabilities(_acc(dtype=np.float64), _wsum()),
            r"acc must have dtype float32 or float16, got numpy float64 array of shape \(3, 4, 2, 2\) on cpu",
        ),
        (
            lambda: native.probabilities(_acc(dtype=np.int32), _wsum()),
            "acc must have dtype float32 or float16, got numpy int32",
        ),
        (
            lambda: native.probabilities(_acc((3, 4, 2, 4))[..., ::2], _wsum()),
            r"acc must be C-contiguous .*numpy float32 array of shape \(3, 4, 2, 2\)",
        ),
        (
            lambda: native.probabilities(_acc(), _wsum((2, 2, 4)).transpose(2, 0, 1)),
            r"wsum must be C-contiguous .*numpy float32 array of shape \(4, 2, 2\)",
        ),
        (
            lambda: native.probabilities(_acc(), _wsum(dtype=np.float16)),
            r"wsum must have dtype float32, got numpy float16 array of shape \(4, 2, 2\) on cpu",
        ),
        (
            lambda: native.probabilities(_acc(), _wsum((4, 2, 3))),
            r"wsum must have shape \(4, 2, 2\), got numpy float32 array of shape \(4, 2, 3\) on cpu",
        ),
        (lambda: native.probabilities(_acc((4, 2, 2)), _wsum()), "acc must have 4 dimensions, got numpy float32"),
        (lambda: native.probabilities(_acc((0, 4, 2, 2)), _wsum()), "acc must have at least one channel"),
        (lambda: native.probabilities([[0.0]], _wsum()), "acc must be a numpy array, torch tensor or cupy array"),
        (
            lambda: native.probabilities(_acc(), _wsum(), kind="softmax"),
            "kind must be 'logits' or 'probabilities', got 'softmax'",
        ),
        (lambda: native.probabilities(_acc(), _wsum(), kind=None), "kind must be a string, got None"),
        (
            lambda: native.probabilities(_acc(), _wsum(), rows=(2, 5)),
            r"rows must satisfy 0 <= start <= end <= 4, got \(2, 5\)",
        ),
        (
            lambda: native.probabilities(_acc(), _wsum(), algorithm="gather"),
            "algorithm must be 'auto', 'blocked' or 'voxel', got 'gather'",
        ),
    ],
)
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_refuses_bfloat16_and_strided_torch_tensors():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="acc must have dtype float32 or float16, got torch bfloat16"):
        native.probabilities(torch.zeros((2, 3, 4, 5), dtype=torch.bfloat16), torch.ones((3, 4, 5)))
    with pytest.raises(ValueError, match=r"acc must be C-contiguous .* got a strided torch float32 array"):
        native.probabilities(torch.zeros((2, 5, 4, 3)).permute(0, 3, 2, 1), torch.ones((3, 4, 5)))


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("channels", [1, 2, 3, 105])
@pytest.mark.parametrize("acc_dtype", [np.float32, np.float16])
def test_cuda_matches_cpu_bit_for_bit(rng, channels, acc_dtype):
    torch = pytest.importorskip("torch")
    for kind in ("logits", "probabilities"):
        acc, wsum = blend(rng, channels, shape=(7, 33, 35), acc_dtype=acc_dtype, kind=kind)
        for rows in (None, (2, 6)):
            dev = native.probabilities(torch.from_numpy(acc).cuda(), torch.from_numpy(wsum).cuda(), kind, rows=rows)
            assert dev.is_cuda and dev.dtype == torch.float32
            np.testing.assert_array_equal(bits(to_numpy(dev)), bits(probs(acc, wsum, kind, "cpu", rows)))


@pytest.mark.cuda
def test_cuda_runs_on_the_callers_stream_and_refuses_the_host_algorithm(rng):
    torch = pytest.importorskip("torch")
    acc, wsum = blend(rng, 4, shape=(6, 64, 64))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        acc_d, wsum_d = torch.from_numpy(acc).cuda(), torch.from_numpy(wsum).cuda()
        dev = native.probabilities(acc_d, wsum_d, rows=(1, 5))
        host = dev.cpu()  # ordered after the kernel on the same stream
    stream.synchronize()
    np.testing.assert_array_equal(bits(host.numpy()), bits(probs(acc, wsum, rows=(1, 5))))
    with pytest.raises(ValueError, match="algorithm 'blocked' is the host kernel; CUDA arrays run 'auto' or 'voxel'"):
        native.probabilities(acc_d, wsum_d, algorithm="blocked")
