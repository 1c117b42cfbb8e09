"""Synthetic CT-like phantoms: determinism, shapes, classes, HU ranges, archive layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from atso_fast.datasets.synthetic import (
    make_archive,
    make_phantom,
    make_phantom_2d,
    make_phantoms,
    phantom_class_names,
    phantom_num_classes,
)


def test_phantom_is_a_pure_function_of_seed_and_index():
    a_img, a_lab = make_phantom((16, 32, 32), seed=3, index=5)
    b_img, b_lab = make_phantom((16, 32, 32), seed=3, index=5)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    # drawing a batch gives the same case at the same index, whatever the start
    batch = make_phantoms(3, (16, 32, 32), seed=3, start=4)
    np.testing.assert_array_equal(batch[1][0], a_img)
    other, _ = make_phantom((16, 32, 32), seed=4, index=5)
    assert not np.array_equal(other, a_img)


@pytest.mark.parametrize("shape", [(32, 64, 64), (9, 17, 23), (1, 32, 32)])
def test_phantom_shapes_dtypes_and_hu(shape):
    image, label = make_phantom(shape, seed=0)
    assert image.shape == label.shape == shape
    assert image.dtype == np.int16 and label.dtype == np.uint8
    assert image.min() >= -1024 and image.max() <= 3071
    assert label.max() < phantom_num_classes()
    assert np.median(image[label == 0]) < -500 or shape[0] == 1  # mostly air outside the body


def test_default_phantom_has_every_class_with_distinct_intensities():
    image, label = make_phantom(seed=0, index=0)
    present = np.unique(label)
    assert present.tolist() == list(range(phantom_num_classes()))
    means = {c: float(image[label == c].mean()) for c in present}
    assert means[2] > means[1] > -100  # kidney brighter than liver, both soft tissue
    assert means[4] < means[1]  # the target is darker than its host organ
    assert means[1] - means[4] < 60  # ... but low contrast


def test_options_change_the_class_layout():
    _, label = make_phantom((16, 32, 32), seed=1, num_organs=2, target=False)
    assert label.max() <= 2
    assert phantom_num_classes(2, False) == 3
    assert phantom_class_names(2, True) == ["background", "liver", "kidney", "target"]


def test_2d_phantom_is_a_depth_one_volume():
    image, label = make_phantom_2d((48, 40), seed=2, index=1)
    assert image.shape == label.shape == (1, 48, 40)
    again, _ = make_phantom_2d((48, 40), seed=2, index=1)
    np.testing.assert_array_equal(image, again)
    assert make_phantoms(2, (48, 40), seed=2)[0][0].shape == (1, 48, 40)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shape": (4, 4)}, "shape"),
        ({"shape": (0, 4, 4)}, "shape"),
        ({"num_organs": 9}, "num_organs"),
        ({"noise_hu": -1.0}, "noise_hu"),
        ({"target_radius": (0.2, 0.1)}, "target_radius"),
    ],
)
def test_phantom_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_phantom(**{"shape": (8, 16, 16), **kwargs})


@pytest.mark.parametrize("fmt", ["nii.gz", "npy"])
def test_make_archive_writes_an_nnunet_layout(tmp_path, fmt):
    from atso_fast.io import read_volume

    out = make_archive(
        tmp_path / "a", 5, num_labelled=2, num_val=1, shape=(8, 16, 16), seed=7, fmt=fmt, unlabelled_truth=True
    )
    assert len(out["labelled"]) == 2 and len(out["unlabelled"]) == 3 and len(out["val"]) == 1
    for sub in ("imagesTr", "labelsTr", "imagesUn", "labelsUn", "imagesVal", "labelsVal"):
        assert (tmp_path / "a" / sub).is_dir()
    meta = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 2
    assert meta["labels"]["target"] == phantom_num_classes() - 1
    entry = out["unlabelled"][1]  # case index 3 of seed 7
    assert entry["image"].endswith(f"phantom_0003_0000.{fmt}")
    image, _ = read_volume(entry["image"])
    label, _ = read_volume(entry["label"])
    ref_image, ref_label = make_phantom((8, 16, 16), seed=7, index=3)
    np.testing.assert_array_equal(image, ref_image)
    np.testing.assert_array_equal(label, ref_label)


def test_make_archive_default_counts_and_errors(tmp_path):
    out = make_archive(tmp_path / "b", 10, num_val=0, shape=(4, 8, 8), fmt="npy")
    assert len(out["labelled"]) == 2 and len(out["unlabelled"]) == 8 and out["val"] == []
    assert all(e["label"] is None for e in out["unlabelled"])
    with pytest.raises(ValueError, match="num_labelled"):
        make_archive(tmp_path / "c", 3, num_labelled=4)
    with pytest.raises(ValueError, match="fmt"):
        make_archive(tmp_path / "d", 3, fmt="mha")
