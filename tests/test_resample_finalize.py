"""resample_finalize: in-plane bilinear resampling and finalize in one native pass.

Three links, each checked exactly: the taps are the weights torch applies (``bilinear_taps``);
the NumPy reference's bilinear is torch's ``upsample_bilinear2d`` bit for bit wherever aten runs
its generic kernel (``aten_generic_bilinear``); the native kernel equals the reference (labels,
confidence, counts) on random inputs and edge shapes, on both CPU builds and thread counts. So
its labels are those of the unfused path (torch's bilinear, then ``native.finalize``), which the
last tests also compare directly, through ``ResampleSink`` too.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from atso_fast.engine.merger import ArrayBackend, LabelSink
from atso_fast.engine.preprocess import axis_op
from atso_fast.engine.resample import ResampleSink, aten_generic_bilinear, bilinear_taps
from atso_fast.kernels import native, reference

SIZES = [
    (273, 512),
    (512, 273),
    (7, 3),
    (1, 5),
    (5, 1),
    (64, 31),
    (33, 100),
    (200, 375),
    (150, 281),
    (17, 17),
    (2, 1),
    (100, 187),
    (3, 700),
]


@pytest.fixture
def torch_threads():
    """Run a test body at a given torch thread count, restoring it after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _torch_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_in, n_out): the weight torch gives input j in output o (one-hot rows, height 1 -> 1)."""
    eye = torch.eye(n_in).reshape(n_in, 1, 1, n_in)
    return torch.nn.functional.interpolate(eye, size=(1, n_out), mode="bilinear", align_corners=False)[:, 0, 0].numpy()


def _dense(taps, n_in: int) -> np.ndarray:
    i0, i1, w0, w1 = taps
    out = np.zeros((n_in, len(i0)), np.float32)
    np.add.at(out, (i0, np.arange(len(i0))), w0)
    np.add.at(out, (i1, np.arange(len(i0))), w1)
    return out


def _torch_bilinear(rows: np.ndarray, yn: int, xn: int) -> np.ndarray:
    return torch.nn.functional.interpolate(
        torch.from_numpy(rows), size=(yn, xn), mode="bilinear", align_corners=False
    ).numpy()


def _specials(a: np.ndarray, rng) -> np.ndarray:
    """A few NaN, +inf, -inf and exact ties sprinkled in."""
    flat = a.reshape(-1)
    idx = rng.choice(flat.size, size=min(12, flat.size), replace=False)
    flat[idx[:3]] = np.nan
    flat[idx[3:6]] = np.inf
    flat[idx[6:9]] = -np.inf
    return a


@pytest.mark.parametrize("n_in,n_out", SIZES)
def test_taps_are_the_weights_torch_applies(n_in, n_out, torch_threads):
    torch_threads(2)
    taps = bilinear_taps(n_in, n_out)
    assert taps[0].dtype == np.int64 and taps[2].dtype == np.float32
    assert np.all((0 <= taps[0]) & (taps[0] < n_in) & (0 <= taps[1]) & (taps[1] < n_in))
    np.testing.assert_array_equal(_dense(taps, n_in), _torch_weights(n_in, n_out))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "yt,yn,xt,xn,planes",
    [
        (273, 512, 273, 512, 1),
        (40, 75, 37, 69, 2),
        (150, 80, 140, 75, 4),
        (1, 100, 50, 29, 1),
        (64, 64, 30, 90, 5),
        (3, 130, 2, 1, 2),
    ],
)
def test_reference_bilinear_is_torch_bit_for_bit(yt, yn, xt, xn, planes, threads, torch_threads):
    torch_threads(threads)
    assert aten_generic_bilinear(yn, xn, planes, threads)
    rows = (np.random.default_rng(yt * xn).standard_normal((3, planes, yt, xt)) * 8).astype(np.float32)
    got = reference.bilinear_rows(rows, bilinear_taps(yt, yn), bilinear_taps(xt, xn))
    np.testing.assert_array_equal(got.view(np.uint32), _torch_bilinear(rows, yn, xn).view(np.uint32))


def test_aten_generic_bilinear_rule():
    assert not aten_generic_bilinear(64, 64, 1, 2)  # small output plane: aten's separable kernel
    assert aten_generic_bilinear(65, 64, 1, 2)
    assert not aten_generic_bilinear(512, 512, 3, 1)
    assert aten_generic_bilinear(512, 512, 3, 2) and aten_generic_bilinear(512, 512, 2, 1)


CASES = [  # channels, R, Yt, Xt, Yn, Xn, kind, threshold, ignore_index
    (105, 1, 27, 27, 51, 51, "logits", 0.0, 255),
    (4, 3, 20, 31, 37, 58, "logits", 0.4, 255),
    (1, 2, 16, 16, 30, 30, "logits", 0.7, 255),  # one sigmoid channel
    (1, 1, 9, 9, 17, 17, "probabilities", 0.0, 255),
    (3, 2, 12, 12, 23, 23, "probabilities", 0.5, 255),
    (2, 1, 1, 1, 5, 7, "logits", 0.0, 255),  # one input sample in the plane
    (6, 2, 33, 40, 33, 75, "logits", 0.0, 300),  # identity along y; uint16 labels
    (5, 1, 50, 60, 21, 22, "logits", 0.2, 255),  # downsampling
    (3, 4, 8, 8, 1, 1, "logits", 0.0, 255),  # one output sample
    (7, 1, 10, 300, 19, 561, "logits", 0.0, 255),  # several blocks per output line
]


@pytest.mark.parametrize("isa", ["generic", "auto"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_native_matches_reference(case, threads, isa):
    from atso_fast import _C

    c, r, yt, xt, yn, xn, kind, threshold, ignore = case
    rng = np.random.default_rng(c * 100 + yn)
    rows = (rng.standard_normal((c, r, yt, xt)) * 6).astype(np.float32)
    if kind == "probabilities":
        rows = rng.random((c, r, yt, xt), dtype=np.float32)
    rows = _specials(rows, rng)
    taps = bilinear_taps(yt, yn), bilinear_taps(xt, xn)
    vals = reference.bilinear_rows(rows, *taps)
    labels, conf, counts = reference.finalize(vals, np.ones(vals.shape[1:], np.float32), threshold, ignore, kind)
    assert _C.set_cpu_isa(isa)
    try:
        with native.kernel_threads(threads):
            got = native.resample_finalize(rows, *taps, threshold, ignore, kind)
    finally:
        _C.set_cpu_isa("auto")
    assert got.labels.shape == (r, yn, xn) and got.labels.dtype == labels.dtype
    np.testing.assert_array_equal(got.labels, labels)
    np.testing.assert_array_equal(got.confidence, conf)
    k = len(counts) - 2
    np.testing.assert_array_equal(got.counts, counts[:k])
    assert (got.ignored, got.invalid) == (counts[k], counts[k + 1])
    assert got.invalid > 0  # the NaN/inf inputs reached some outputs


def test_native_matches_torch_bilinear_then_finalize(torch_threads):
    """The unfused path: torch's bilinear, then native.finalize with unit weights, 105 classes."""
    torch_threads(2)
    rows = (np.random.default_rng(7).standard_normal((105, 2, 91, 91)) * 8).astype(np.float32)
    up = _torch_bilinear(rows, 171, 171)
    want = native.finalize(up, np.ones(up.shape[1:], np.float32), 0.0, 255, "logits")
    got = native.resample_finalize(rows, bilinear_taps(91, 171), bilinear_taps(91, 171), 0.0, 255, "logits")
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.confidence, want.confidence)
    np.testing.assert_array_equal(got.counts, want.counts)


def _sink_run(fused: bool, classes: int, zt: int, zn: int, yt: int, yn: int) -> LabelSink:
    ops = [axis_op(zt, zn, 1), axis_op(yt, yn, 1), axis_op(yt, yn, 1)]
    rng = np.random.default_rng(3)
    slab = (rng.standard_normal((classes, zt, yt, yt)) * 8).astype(np.float32)
    wsum = (rng.random((zt, yt, yt), dtype=np.float32) + 0.5).astype(np.float32)
    inner = LabelSink(
        (zn, yn, yn), classes, kind="logits", threshold=0.3, ignore_index=255, backend=ArrayBackend("cpu")
    )
    sink = ResampleSink(inner, ops, fuse=fused)
    for z in range(0, zt, 3):
        n = min(3, zt - z)
        sink.take(slab[:, z : z + n], wsum[z : z + n], z, n)
    return sink.finalize()


@pytest.mark.parametrize("classes", [2, 30])
def test_resample_sink_fused_equals_unfused(classes, torch_threads):
    torch_threads(2)
    a = _sink_run(True, classes, 9, 17, 70, 131)
    b = _sink_run(False, classes, 9, 17, 70, 131)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.confidence, b.confidence)
    np.testing.assert_array_equal(a.totals.counts, b.totals.counts)
    assert (a.totals.ignored, a.totals.invalid) == (b.totals.ignored, b.totals.invalid)


def test_bad_arguments_are_named():
    rows = np.zeros((2, 1, 4, 4), np.float32)
    good = bilinear_taps(4, 7)
    bad = (good[0] + 5, *good[1:])
    with pytest.raises(ValueError, match=r"y_taps\[0\] \(i0\) must index \[0, 4\)"):
        native.resample_finalize(rows, bad, good, 0.0, 255, "logits")
    with pytest.raises(ValueError, match=r"x_taps\[2\] \(w0\) must have dtype float32"):
        native.resample_finalize(
            rows, good, (good[0], good[1], good[2].astype(np.float64), good[3]), 0.0, 255, "logits"
        )
    with pytest.raises(ValueError, match="rows must have dtype float32"):
        native.resample_finalize(rows.astype(np.float64), good, good, 0.0, 255, "logits")
    with pytest.raises(ValueError, match="threshold must be in"):
        native.resample_finalize(rows, good, good, 2.0, 255, "logits")
    with pytest.raises(TypeError, match="y_taps must be a tuple"):
        native.resample_finalize(rows, good[:3], good, 0.0, 255, "logits")
    with pytest.raises(ValueError, match="bilinear_taps needs"):
        bilinear_taps(0, 3)
