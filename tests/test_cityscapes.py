"""The Cityscapes label table and maps against the official values, the folder layouts, and the
procedural driving scenes that write them (issue 24)."""

from __future__ import annotations

import numpy as np
import pytest

from atso_fast.datasets.cityscapes import (
    IGNORE_INDEX,
    LABELS,
    TRAIN_NAMES,
    cityscapes_frames,
    is_cityscapes_split,
    label_id_colors,
    label_ids_to_train_ids,
    load_frame,
    plain_frames,
    train_id_colors,
    train_ids_to_label_ids,
    train_to_label_map,
)
from atso_fast.datasets.driving import DOMAINS, make_driving_cityscapes, make_scene
from atso_fast.io import InputError
from atso_fast.io.atomic import atomic_write_bytes
from atso_fast.io.images import encode_png

OFFICIAL_TRAIN = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
"""cityscapesScripts labels.py: the 19 evaluated labelIds and their trainIds (everything else 255)."""


@pytest.mark.parametrize(
    "label_id, train_id",
    [
        (7, 0),
        (8, 1),
        (11, 2),
        (26, 13),
        (24, 11),
        (0, 255),
        (-1, 255),
        (1, 255),
        (9, 255),
        (29, 255),
        (33, 18),
        (34, 255),
        (255, 255),
    ],
)
def test_key_entries_of_the_official_table(label_id, train_id):
    assert label_ids_to_train_ids(np.array([label_id], np.int32)).tolist() == [train_id]


def test_every_label_id_maps_as_the_official_table():
    ids = np.arange(256, dtype=np.uint8)
    want = [OFFICIAL_TRAIN.get(k, IGNORE_INDEX) for k in range(256)]
    assert label_ids_to_train_ids(ids).tolist() == want
    assert len(LABELS) == 35 and [lab.id for lab in LABELS[:34]] == list(range(34))
    plate = LABELS[-1]
    assert (plate.name, plate.id, plate.train_id, plate.ignore_in_eval) == ("license plate", -1, -1, True)
    assert TRAIN_NAMES == (
        "road",
        "sidewalk",
        "building",
        "wall",
        "fence",
        "pole",
        "traffic light",
        "traffic sign",
        "vegetation",
        "terrain",
        "sky",
        "person",
        "rider",
        "car",
        "truck",
        "bus",
        "train",
        "motorcycle",
        "bicycle",
    )
    by_name = {lab.name: lab for lab in LABELS}
    assert by_name["road"].color == (128, 64, 128) and by_name["car"].color == (0, 0, 142)
    assert by_name["person"].category == "human" and by_name["person"].has_instances
    assert by_name["sky"].color == (70, 130, 180) and not by_name["sky"].has_instances


def test_train_ids_back_to_label_ids():
    train = np.array([[0, 1, 2, 13], [11, 18, 255, 10]], np.uint8)
    ids = train_ids_to_label_ids(train)
    assert ids.tolist() == [[7, 8, 11, 26], [24, 33, 0, 23]]
    np.testing.assert_array_equal(label_ids_to_train_ids(ids), train)
    assert train_to_label_map()[13] == 26 and train_to_label_map()[255] == 0
    with pytest.raises(ValueError, match=r"values \[19\] are not Cityscapes trainIds"):
        train_ids_to_label_ids(np.array([19]))
    with pytest.raises(ValueError, match="integer array"):
        label_ids_to_train_ids(np.zeros(2, np.float32))


def test_palettes_follow_the_table():
    assert train_id_colors()[0].tolist() == [128, 64, 128] and train_id_colors()[255].tolist() == [0, 0, 0]
    assert label_id_colors()[26].tolist() == [0, 0, 142] and label_id_colors()[7].tolist() == [128, 64, 128]


# ------------------------------------------------------------------------------ layouts
def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, encode_png(array))


def test_cityscapes_layout_pairs_frames_and_labels(tmp_path):
    root = make_driving_cityscapes(tmp_path / "cs", splits={"train": 3, "val": 2}, height=40, width=64)
    frames = cityscapes_frames(root, "val")
    assert [(f.city, f.name) for f in frames] == [
        ("aachen", "aachen_000000_000000"),
        ("bremen", "bremen_000000_000001"),
    ]
    assert frames[0].label == root / "gtFine/val/aachen/aachen_000000_000000_gtFine_labelIds.png"
    rgb, train = load_frame(frames[0])
    _, label_ids = make_scene(0, 3, height=40, width=64)  # val comes after the 3 train frames
    assert rgb.shape == (3, 40, 64) and train.tolist() == label_ids_to_train_ids(label_ids).tolist()
    assert is_cityscapes_split(root / "leftImg8bit" / "val") and is_cityscapes_split(root / "leftImg8bit")
    assert not is_cityscapes_split(root / "gtFine" / "val")
    assert all(f.label is None for f in cityscapes_frames(root, "train", labels=False))


def test_cityscapes_layout_names_missing_and_orphan_files(tmp_path):
    root = make_driving_cityscapes(tmp_path / "cs", splits={"val": 2}, height=40, width=64)
    (root / "gtFine/val/aachen/aachen_000000_000000_gtFine_labelIds.png").unlink()
    write_png(root / "gtFine/val/bremen/bremen_000000_000009_gtFine_labelIds.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError) as info:
        cityscapes_frames(root, "val")
    message = str(info.value)
    assert "1 frame(s) without a label: " in message and "aachen_000000_000000_leftImg8bit.png (expected " in message
    assert "1 label(s) without a frame: " in message and "bremen_000000_000009_leftImg8bit.png)" in message
    with pytest.raises(InputError, match=r"leftImg8bit/test: no such folder"):
        cityscapes_frames(root, "test")


def test_plain_layout(tmp_path):
    write_png(tmp_path / "images/a.png", np.zeros((4, 5, 3), np.uint8))
    write_png(tmp_path / "images/sub/b.png", np.zeros((4, 5, 3), np.uint8))
    write_png(tmp_path / "labels/a.png", np.full((4, 5), 3, np.uint8))
    write_png(tmp_path / "labels/sub/b.png", np.full((4, 5), 255, np.uint8))
    frames = plain_frames(tmp_path)
    assert [f.name for f in frames] == ["a", "sub/b"] and load_frame(frames[0])[1].max() == 3
    (tmp_path / "labels/sub/b.png").unlink()
    with pytest.raises(InputError, match=r"1 frame\(s\) without a label: .*images/sub/b\.png \(expected .*labels/sub"):
        plain_frames(tmp_path)
    write_png(tmp_path / "images/a.jpg", np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(InputError, match=r"are both frame 'a'"):
        plain_frames(tmp_path, labels=False)


def test_load_frame_refuses_a_label_of_another_size(tmp_path):
    write_png(tmp_path / "images/a.png", np.zeros((4, 5, 3), np.uint8))
    write_png(tmp_path / "labels/a.png", np.zeros((4, 6), np.uint8))
    with pytest.raises(InputError, match=r"labels/a\.png: expected one 8-bit band of 4 x 5 pixels"):
        load_frame(plain_frames(tmp_path)[0])


# ------------------------------------------------------------------------------ scenes
def test_scenes_are_seeded_and_domains_change_the_look_only():
    rgb, ids = make_scene(3, 1)
    again, same = make_scene(3, 1)
    np.testing.assert_array_equal(rgb, again)
    np.testing.assert_array_equal(ids, same)
    assert not np.array_equal(ids, make_scene(3, 2)[1])
    for domain in DOMAINS:
        look, layout = make_scene(3, 1, domain=domain)
        np.testing.assert_array_equal(layout, ids)
        assert domain == "day" or np.abs(look.astype(int) - rgb).mean() > 5
    night = make_scene(3, 1, domain="night")[0]
    assert night.mean() < rgb.mean() / 2
    with pytest.raises(ValueError, match="domain must be one of"):
        make_scene(0, 0, domain="snow")


def test_scenes_hold_the_street_classes_as_label_ids():
    seen = set()
    for index in range(8):
        rgb, ids = make_scene(0, index)
        assert rgb.shape == (128, 256, 3) and rgb.dtype == np.uint8 and ids.shape == (128, 256)
        seen |= set(np.unique(ids).tolist())
    assert {7, 8, 11, 21, 22, 23, 24, 26} <= seen <= {1, 7, 8, 11, 17, 20, 21, 22, 23, 24, 26}
