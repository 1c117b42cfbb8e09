"""Window grid and padding against MONAI's own helpers and hand-computed tables."""

from __future__ import annotations

import numpy as np
import pytest

from atso_fast.engine.windows import (
    batch_bounds,
    check_overlap,
    padding_before,
    sliding_window_origins,
    window_starts,
)


def test_window_starts_hand_computed():
    assert window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert window_starts(11, 4, 2) == [0, 2, 4, 6, 7]  # last window shifted back to end at 11
    assert window_starts(4, 4, 4) == [0]
    assert window_starts(5, 4, 4) == [0, 1]


def test_padding_is_split_like_monai():
    assert padding_before((5, 10, 3), (8, 8, 8)) == (1, 0, 2)


@pytest.mark.parametrize(
    "size,roi,overlap",
    [
        ((64, 70, 33), (32, 32, 32), 0.5),
        ((20, 9, 41), (16, 16, 16), 0.25),
        ((5, 6, 7), (8, 8, 8), 0.5),
        ((96, 96, 96), (96, 96, 96), 0.5),
        ((30, 30, 30), (8, 8, 8), 0.0),
        ((1, 50, 61), (1, 16, 16), 0.75),
    ],
)
def test_grid_matches_monai(size, roi, overlap):
    utils = pytest.importorskip("monai.inferers.utils")
    data_utils = pytest.importorskip("monai.data.utils")
    pad = padding_before(size, roi)
    padded = [max(s, r) for s, r in zip(size, roi)]
    interval = utils._get_scan_interval(padded, roi, 3, (overlap,) * 3)
    slices = data_utils.dense_patch_slices(padded, roi, interval)
    want = np.asarray([[s.start for s in sl] for sl in slices], np.int64) - np.asarray(pad)
    np.testing.assert_array_equal(sliding_window_origins(size, roi, overlap), want)


def test_overlap_validation_names_value():
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\), got 1.0"):
        check_overlap(1.0)
    with pytest.raises(ValueError, match="overlap must be a number or 3 numbers"):
        check_overlap((0.5, 0.5))
    with pytest.raises(ValueError, match="window sizes must be >= 1"):
        sliding_window_origins((4, 4, 4), (0, 2, 2))


@pytest.mark.parametrize(
    "n,batch,sizes",
    [
        (10, 4, [4, 3, 3]),
        (18, 4, [4, 4, 4, 3, 3]),
        (8, 4, [4, 4]),
        (3, 4, [3]),
        (0, 4, []),
        (5, 1, [1, 1, 1, 1, 1]),
        (7, 100, [7]),
        (9, 4, [3, 3, 3]),
    ],
)
def test_batch_bounds_hand_computed(n, batch, sizes):
    bounds = batch_bounds(n, batch)
    assert [hi - lo for lo, hi in bounds] == sizes
    assert [lo for lo, _ in bounds] == [sum(sizes[:i]) for i in range(len(sizes))]  # consecutive from 0


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 17, 18, 64, 101])
def test_batch_bounds_are_even_and_cover_every_window_once(n, batch):
    bounds = batch_bounds(n, batch)
    sizes = [hi - lo for lo, hi in bounds]
    assert sum(sizes) == n and len(bounds) == -(-n // batch)
    assert all(0 < s <= batch for s in sizes)
    assert not sizes or max(sizes) - min(sizes) <= 1
    assert [i for lo, hi in bounds for i in range(lo, hi)] == list(range(n))


@pytest.mark.parametrize(
    "n,batch,sizes",
    [
        (10, 4, [4, 4, 2]),
        (18, 4, [4, 4, 4, 4, 2]),
        (8, 4, [4, 4]),
        (3, 4, [3]),
        (0, 4, []),
        (5, 1, [1] * 5),
    ],
)
def test_batch_bounds_not_even_are_monais_full_batches_then_the_rest(n, batch, sizes):
    bounds = batch_bounds(n, batch, even=False)
    assert bounds == [(i, min(i + batch, n)) for i in range(0, n, batch)]
    assert [hi - lo for lo, hi in bounds] == sizes


def test_batch_bounds_refuses_bad_arguments():
    with pytest.raises(ValueError, match="batch_size >= 1, got n=3, batch_size=0"):
        batch_bounds(3, 0)
    with pytest.raises(ValueError, match="n >= 0"):
        batch_bounds(-1, 4)
