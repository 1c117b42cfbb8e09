"""Per-case Dice and HD95 (atso_fast.train.metrics) against hand-computed values."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from atso_fast.train.metrics import case_metrics, format_metrics


def square_pair(k: int, axis: int, size: int = 10, shape: tuple[int, int] = (40, 40)) -> tuple[np.ndarray, np.ndarray]:
    """Two ``size x size`` squares of class 1, the second shifted by ``k`` voxels along ``axis``."""
    a = np.zeros(shape, dtype=np.int64)
    b = np.zeros(shape, dtype=np.int64)
    a[10 : 10 + size, 10 : 10 + size] = 1
    shifted = [slice(10, 10 + size), slice(10, 10 + size)]
    shifted[axis] = slice(10 + k, 10 + k + size)
    b[tuple(shifted)] = 1
    return a, b


def test_dice_hand_computed():
    # class 1: pred cols 0-2, truth cols 1-4 -> TP 2, FP 1, FN 2 -> 4 / 7
    # class 2: pred cols 3-4 of row 1, truth col 4 of row 1 -> TP 1, FP 1, FN 0 -> 2 / 3
    pred = np.array([[1, 1, 1, 0, 0], [0, 0, 0, 2, 2]])
    truth = np.array([[0, 1, 1, 1, 1], [0, 0, 0, 0, 2]])
    m = case_metrics([pred], [truth], 3, hd95=False)
    assert m["cases"] == 1
    assert m["dice_per_case"] == [[pytest.approx(4 / 7), pytest.approx(2 / 3)]]
    assert m["mean_dice"] == pytest.approx((4 / 7 + 2 / 3) / 2)
    assert m["hd95_per_case"] == []
    assert all(math.isnan(v) for v in m["hd95_mean"])


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize(
    "axis, spacing, scale",
    [
        (0, None, 1.0),
        (0, (2.0, 1.0), 2.0),  # the shift runs along axis 0, whose voxels are 2 mm
        (1, (2.0, 1.0), 1.0),  # the shift runs along axis 1, whose voxels are 1 mm
        (1, (1.0, 0.5), 0.5),
    ],
)
def test_hd95_shifted_squares(k, axis, spacing, scale):
    # Hand computation: the leading edge of each square (10 of its 36 boundary voxels, > 5%) lies
    # exactly k voxels from the other square's boundary and no boundary voxel lies farther, so both
    # directed 95th percentiles are k voxels, i.e. k * spacing[axis] mm.
    a, b = square_pair(k, axis)
    m = case_metrics([a], [b], 2, spacing=spacing)
    assert m["hd95_per_case"][0][0] == pytest.approx(k * scale, abs=1e-5)
    assert m["dice_per_case"][0][0] == pytest.approx(2 * 10 * (10 - k) / 200)
    assert m["hd95_missing"] == [0]


def test_hd95_is_the_95th_percentile_not_the_maximum():
    # a 1-voxel line of 40 voxels in both maps, plus one stray predicted voxel 20 rows away:
    # pred -> truth distances are forty 0s and one 20; their 95th percentile (position 38 of
    # 0..40) is 0, while the plain Hausdorff distance would be 20
    truth = np.zeros((40, 50), dtype=np.int64)
    truth[5, 5:45] = 1
    pred = truth.copy()
    pred[25, 20] = 1
    m = case_metrics([pred], [truth], 2)
    assert m["hd95_per_case"][0][0] == 0.0
    assert m["dice_per_case"][0][0] == pytest.approx(80 / 81)
    pred[25, 10:30] = 1  # now 20 of 60 boundary voxels are 20 away
    assert case_metrics([pred], [truth], 2)["hd95_per_case"][0][0] == pytest.approx(20.0, abs=1e-5)


def test_spacing_per_case_list():
    a, b = square_pair(2, axis=0)
    m = case_metrics([a, a], [b, b], 2, spacing=[(1.0, 1.0), (3.0, 1.0)])
    assert np.asarray(m["hd95_per_case"])[:, 0] == pytest.approx([2.0, 6.0], abs=1e-5)
    assert m["hd95_mean"][0] == pytest.approx(4.0, abs=1e-5)
    assert m["hd95_sd"][0] == pytest.approx(np.std([2.0, 6.0], ddof=1), abs=1e-5)
    flat = case_metrics([a, a], [b, b], 2, spacing=(3.0, 1.0))
    assert np.asarray(flat["hd95_per_case"])[:, 0] == pytest.approx([6.0, 6.0], abs=1e-5)


def test_absent_class_is_nan_and_left_out_of_means():
    a, b = square_pair(2, axis=0)
    c0_pred, c0_truth = a.copy(), b.copy()  # case 0: class 2 in neither map
    c1_pred, c1_truth = a.copy(), a.copy()  # case 1: class 2 identical in both
    c1_pred[30:34, 30:34] = 2
    c1_truth[30:34, 30:34] = 2
    m = case_metrics([c0_pred, c1_pred], [c0_truth, c1_truth], 4)
    assert math.isnan(m["dice_per_case"][0][1]) and math.isnan(m["hd95_per_case"][0][1])
    assert m["dice_per_case"][1][1] == 1.0 and m["hd95_per_case"][1][1] == 0.0
    assert m["dice_mean"][1] == 1.0 and math.isnan(m["dice_sd"][1])  # one case with a value
    assert math.isnan(m["dice_mean"][2]) and math.isnan(m["hd95_mean"][2])  # class 3 nowhere
    assert m["mean_dice"] == pytest.approx((m["dice_mean"][0] + 1.0) / 2)
    assert m["hd95_missing"] == [0, 0, 0]


def test_class_in_one_map_only_counts_as_hd95_missing():
    a, b = square_pair(1, axis=1)
    pred, truth = a.copy(), b.copy()
    pred[30:34, 30:34] = 2  # class 2 predicted, absent from truth
    truth2, pred2 = a.copy(), a.copy()
    truth2[30:34, 30:34] = 2  # class 2 missed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no MONAI empty-mask warnings either
        m = case_metrics([pred, pred2], [truth, truth2], 3)
    assert [row[1] for row in m["dice_per_case"]] == [0.0, 0.0]
    assert all(math.isnan(row[1]) for row in m["hd95_per_case"])
    assert m["hd95_missing"] == [0, 2]
    assert m["hd95_per_case"][0][0] == pytest.approx(1.0, abs=1e-5)
    assert m["hd95_per_case"][1][0] == 0.0
    assert m["mean_hd95"] == pytest.approx(0.5, abs=1e-5)  # class 2 has no distance to average


def test_ignore_index_voxels_are_excluded():
    a, b = square_pair(2, axis=0)
    clean = case_metrics([a], [b], 2)
    pred, truth = a.copy(), b.copy()
    pred[30:36, 0:8] = 1  # a far false positive ...
    truth[30:36, 0:8] = 255  # ... on voxels the truth ignores
    truth[0:3, 30:40] = 255  # an ignored region of background
    m = case_metrics([pred], [truth], 2, ignore_index=255)
    assert m["dice_per_case"] == clean["dice_per_case"]
    assert m["hd95_per_case"][0][0] == pytest.approx(clean["hd95_per_case"][0][0], abs=1e-6)
    counted = case_metrics([pred], [np.where(truth == 255, 0, truth)], 2)
    assert counted["dice_per_case"][0][0] < clean["dice_per_case"][0][0]  # the region did matter
    assert counted["hd95_per_case"][0][0] > 10.0


def test_sd_is_sample_sd_over_cases(rng):
    preds = [rng.integers(0, 3, size=(12, 12)) for _ in range(5)]
    truths = [rng.integers(0, 3, size=(12, 12)) for _ in range(5)]
    m = case_metrics(preds, truths, 3)
    table = np.asarray(m["dice_per_case"])
    assert m["dice_mean"] == pytest.approx(table.mean(axis=0).tolist())
    assert m["dice_sd"] == pytest.approx(table.std(axis=0, ddof=1).tolist())
    assert m["mean_dice_sd"] == pytest.approx(float(table.mean(axis=1).std(ddof=1)))
    hd = np.asarray(m["hd95_per_case"])
    assert m["hd95_sd"] == pytest.approx(hd.std(axis=0, ddof=1).tolist())
    assert m["mean_hd95_sd"] == pytest.approx(float(hd.mean(axis=1).std(ddof=1)))


def test_3d_cubes_shifted_along_z():
    pred = np.zeros((12, 12, 12), dtype=np.uint8)
    truth = np.zeros_like(pred)
    pred[2:6, 4:8, 4:8] = 1
    truth[3:7, 4:8, 4:8] = 1  # shifted by one slice: TP 48 of 64 each
    m = case_metrics([pred], [truth], 2, spacing=(3.0, 0.8, 0.8))
    assert m["dice_per_case"][0][0] == pytest.approx(96 / 128)
    assert m["hd95_per_case"][0][0] == pytest.approx(3.0, abs=1e-5)


def test_empty_input_and_json():
    m = case_metrics([], [], 3)
    assert m["cases"] == 0 and m["dice_per_case"] == [] and m["hd95_missing"] == [0, 0]
    assert all(math.isnan(v) for v in m["dice_mean"] + m["dice_sd"] + m["hd95_mean"])
    assert math.isnan(m["mean_dice"]) and math.isnan(m["mean_hd95"])
    a, b = square_pair(1, axis=0)
    full = case_metrics([a], [b], 3)
    assert json.loads(json.dumps(full))["hd95_missing"] == [0, 0]  # plain Python types throughout


@pytest.mark.parametrize(
    "preds, truths, num_classes, kwargs, match",
    [
        ([np.zeros((4, 4), int)], [], 2, {}, "same number of cases, got 1 and 0"),
        ([np.zeros((4, 4), int)], [np.zeros((4, 5), int)], 2, {}, r"pred shape \(4, 4\) != truth shape \(4, 5\)"),
        ([np.zeros((4, 4), int)], [np.zeros((4, 4), int)], 1, {}, "num_classes must be an integer >= 2"),
        ([np.full((4, 4), 3)], [np.zeros((4, 4), int)], 3, {}, r"case 0: pred has labels outside \[0, 3\): \[3\]"),
        ([np.zeros((4, 4), int)], [np.full((4, 4), -1)], 3, {}, r"case 0: truth has labels outside"),
        ([np.zeros((4, 4), int)], [np.full((4, 4), 7)], 3, {"ignore_index": 255}, r"\[0, 3\) or 255: \[7\]"),
        ([np.zeros((4, 4), int)], [np.zeros((4, 4), int)], 3, {"ignore_index": 1}, "ignore_index must lie outside"),
        ([np.zeros(4, int)], [np.zeros(4, int)], 2, {}, "must be 2D"),
        ([np.zeros((4, 4))], [np.zeros((4, 4), int)], 2, {}, "integer label map, got dtype float64"),
        ([np.zeros((4, 4), int)], [np.zeros((4, 4), int)], 2, {"spacing": (1.0, 1.0, 1.0)}, "spacing must be 2"),
        ([np.zeros((4, 4), int)], [np.zeros((4, 4), int)], 2, {"spacing": (1.0, 0.0)}, "positive finite"),
        (
            [np.zeros((4, 4), int)],
            [np.zeros((4, 4), int)],
            2,
            {"spacing": [(1, 1), (1, 1)]},
            "2 per-case spacings for 1",
        ),
    ],
)
def test_bad_inputs_raise(preds, truths, num_classes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        case_metrics(preds, truths, num_classes, **kwargs)


def test_format_metrics():
    a, b = square_pair(2, axis=0)
    m = case_metrics([a, a], [b, a], 2)  # Dice 0.8 and 1.0, HD95 2 and 0
    line = format_metrics(m, ["liver"])
    assert line == "Dice 0.900 +- 0.141 (liver 0.900 +- 0.141), HD95 1.0 +- 1.4 mm"
    assert format_metrics(m, ["background", "liver"]) == line
    assert format_metrics(case_metrics([a], [b], 2, hd95=False)).startswith("Dice 0.800 +- nan (class 1 0.800")
    with pytest.raises(ValueError, match="needs 1 foreground names"):
        format_metrics(m, ["a", "b", "c"])
