"""The ``nnunet`` window-grid profile against nnU-Net v2's own functions (and hand-made tables)."""

from __future__ import annotations

import numpy as np
import pytest

from atso_fast.engine.windows import (
    grid_importance,
    grid_origins,
    nnunet_gaussian,
    nnunet_origins,
    nnunet_steps,
)


def test_steps_known_answers():
    # nnU-Net's own comment: image 110, patch 64, step 0.5 -> 0, 23, 46
    assert nnunet_steps([110], [64], [0.5]) == [[0, 23, 46]]
    assert nnunet_steps([64], [64], [0.5]) == [[0]]
    assert nnunet_steps([65], [64], [0.5]) == [[0, 1]]
    assert nnunet_steps([100, 10], [50, 10], [1.0, 0.5]) == [[0, 50], [0]]
    with pytest.raises(ValueError, match="at least the tile"):
        nnunet_steps([10], [12], [0.5])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        nnunet_steps([20], [12], [0.0])


@pytest.mark.parametrize("size", [(40, 70, 81), (16, 48, 48), (17, 49, 95), (200, 33, 64)])
@pytest.mark.parametrize("step", [0.5, 0.3, 1.0])
def test_steps_match_nnunet(size, step):
    swp = pytest.importorskip("nnunetv2.inference.sliding_window_prediction")
    tile = (16, 32, 48)
    padded = [max(s, t) for s, t in zip(size, tile)]
    assert nnunet_steps(padded, tile, [step] * 3) == swp.compute_steps_for_sliding_window(padded, tile, step)


def _nnunet_slicer_origins(image_size, patch, step, two_d=False):
    """Window starts nnU-Net's predictor uses, in the coordinates of the unpadded image."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("nnunetv2")
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=step, device=torch.device("cpu"), allow_tqdm=False)

    class _Config:
        patch_size = list(patch)

    predictor.configuration_manager = _Config()
    data, revert = pad_nd_image(torch.zeros((1, *image_size)), list(patch), "constant", {"value": 0}, True, None)
    slicers = predictor._internal_get_sliding_window_slicers(data.shape[1:])
    below = [r.start for r in revert[1:]]
    if two_d:  # slicer = (slice(None), d, sy, sx)
        return np.array([[s[1], s[2].start - below[1], s[3].start - below[2]] for s in slicers])
    return np.array([[sl.start - b for sl, b in zip(s[1:], below)] for s in slicers])


@pytest.mark.parametrize("size", [(40, 70, 81), (10, 20, 30), (16, 48, 48), (33, 100, 47)])
def test_origins_match_nnunet_predictor_3d(size):
    patch = (16, 32, 48)
    want = _nnunet_slicer_origins(size, patch, 0.5)
    got = nnunet_origins(size, patch, 0.5)
    np.testing.assert_array_equal(got, want)  # same windows, same order
    assert got.dtype == np.int64


@pytest.mark.parametrize("size", [(3, 70, 81), (5, 20, 30)])
def test_origins_match_nnunet_predictor_2d(size):
    patch = (32, 48)
    want = _nnunet_slicer_origins(size, patch, 0.5, two_d=True)
    np.testing.assert_array_equal(nnunet_origins(size, (1, *patch), 0.5), want)


@pytest.mark.parametrize("tile", [(16, 32, 48), (64, 64), (5, 7, 9), (64, 160, 192), (1, 3, 2)])
def test_gaussian_matches_compute_gaussian(tile):
    torch = pytest.importorskip("torch")
    swp = pytest.importorskip("nnunetv2.inference.sliding_window_prediction")
    want = (
        swp.compute_gaussian(tuple(tile), sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
        .float()
        .numpy()
    )
    got = nnunet_gaussian(tile)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.float32 and got.min() > 0 and got.max() == pytest.approx(10, rel=1e-3)


@pytest.mark.parametrize("tile", [(64, 160, 192), (5, 7, 9), (1, 1, 1), (2, 3), (17,)])
def test_separable_gaussian_is_the_filtered_impulse_bit_for_bit(tile):
    """The map is built from 1D responses; scipy's N-D filter of the impulse gives the same bits."""
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(tile)
    impulse[tuple(t // 2 for t in tile)] = 1
    full = gaussian_filter(impulse, [t / 8 for t in tile], 0, mode="constant", cval=0)
    full /= np.max(full) / 10.0
    half = full.astype(np.float32).astype(np.float16)  # torch's double -> half path
    half[half == 0] = half[half != 0].min() if (half == 0).any() else 0
    np.testing.assert_array_equal(nnunet_gaussian(tile), half.astype(np.float32))


def test_profiles_dispatch():
    mon = grid_origins("monai", (20, 30, 40), (8, 16, 16), 0.5)
    nnu = grid_origins("nnunet", (20, 30, 40), (8, 16, 16), 0.5)
    assert mon.shape[1] == nnu.shape[1] == 3
    assert grid_importance("nnunet", (8, 16)).shape == (1, 8, 16)
    assert grid_importance("monai", (4, 8, 16)).shape == (4, 8, 16)
    with pytest.raises(ValueError, match="grid profile"):
        grid_origins("other", (20, 30, 40), (8, 16, 16), 0.5)
