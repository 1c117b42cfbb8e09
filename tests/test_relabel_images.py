"""Bulk relabelling of natural-image folders (issue 24): ``atso-fast relabel PKG
cityscapes/leftImg8bit/val OUT`` with a 2D RGB package, label PNGs of each frame's size, labelIds
on request, overlays, and bad frames failing alone."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_images import bomb_png

from atso_fast.archive import relabel_archive
from atso_fast.cli import main
from atso_fast.datasets.cityscapes import NUM_CLASSES, train_id_colors, train_ids_to_label_ids
from atso_fast.datasets.driving import make_driving_cityscapes
from atso_fast.engine import Relabeler
from atso_fast.engine.relabeler import check_label_map, run_fingerprint
from atso_fast.io import Manifest, read_volume
from atso_fast.io.overlay import frame_overlay, overlay_png
from atso_fast.package import PackageError, export_model, load_package
from atso_fast.package.normalize import IMAGENET_RGB, check_policy, normalize


def tiny_rgb_net(classes: int = NUM_CLASSES) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, classes, 1))


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return export_model(
        tiny_rgb_net(),
        tmp_path_factory.mktemp("pkg") / "pkg",
        window=(32, 48),
        num_classes=NUM_CLASSES,
        in_channels=3,
        normalization=IMAGENET_RGB,
        save_torch=False,
    )


@pytest.fixture
def scenes(tmp_path):
    return make_driving_cityscapes(tmp_path / "cityscapes", splits={"val": 3}, height=40, width=72)


def rows_of(out):
    return Manifest(out / "manifest.jsonl").latest()


def test_relabel_a_cityscapes_split(package, scenes, tmp_path, torch_one_thread):
    out = tmp_path / "out"
    assert main(["relabel", str(package), str(scenes / "leftImg8bit" / "val"), str(out), "--overlay", "--quiet"]) == 0
    frames = sorted((scenes / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))
    rows = rows_of(out)
    assert len(frames) == 3 and len(rows) == 3 and all(r["status"] == "ok" for r in rows.values())
    relabeler = Relabeler(package, runtime="onnxruntime")
    for frame in frames:
        case = f"{frame.parent.name}/{frame.name[:-4]}"
        labels, meta = read_volume(out / (case + ".png"))
        assert labels.shape == (1, 40, 72) and labels.dtype == np.uint8 and meta.fmt == "png"
        image, _ = read_volume(frame)
        np.testing.assert_array_equal(labels, relabeler.relabel_volume(image).labels)
        assert rows[case]["shape"] == [1, 40, 72] and rows[case]["outputs"]["overlay"] == case + "_overlay.png"
        with Image.open(out / (case + "_overlay.png")) as picture:
            assert picture.size == (72, 40) and picture.mode == "RGB"


def test_label_ids_on_request(package, scenes, tmp_path, torch_one_thread):
    val = scenes / "leftImg8bit" / "val"
    assert main(["relabel", str(package), str(val), str(tmp_path / "train_ids"), "--quiet"]) == 0
    assert main(["relabel", str(package), str(val), str(tmp_path / "ids"), "--label-ids", "--quiet"]) == 0
    case = "aachen/aachen_000000_000000_leftImg8bit.png"
    train, _ = read_volume(tmp_path / "train_ids" / case)
    ids, _ = read_volume(tmp_path / "ids" / case)
    np.testing.assert_array_equal(ids, train_ids_to_label_ids(train))
    runs = {r["run"] for out in ("ids", "train_ids") for r in rows_of(tmp_path / out).values()}
    assert len(runs) == 2  # another output, another fingerprint: no resume across them


def test_bad_frames_fail_alone(package, scenes, tmp_path, torch_one_thread):
    city = scenes / "leftImg8bit" / "val" / "aachen"
    (city / "aachen_000000_000007_leftImg8bit.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (city / "aachen_000000_000008_leftImg8bit.png").write_bytes(bomb_png())
    out = tmp_path / "out"
    assert main(["relabel", str(package), str(scenes / "leftImg8bit" / "val"), str(out), "--quiet"]) == 1
    rows = rows_of(out)
    assert sorted(r["status"] for r in rows.values()) == ["failed", "failed", "ok", "ok", "ok"]
    corrupt = rows["aachen/aachen_000000_000007_leftImg8bit"]["error"]
    bomb = rows["aachen/aachen_000000_000008_leftImg8bit"]["error"]
    assert "aachen_000000_000007_leftImg8bit.png: not a valid PNG file" in corrupt
    assert "aachen_000000_000008_leftImg8bit.png: PNG header claims 100000 x 100000 pixels" in bomb


def test_label_ids_need_a_cityscapes_package(tmp_path, scenes, capsys):
    other = export_model(
        tiny_rgb_net(4),
        tmp_path / "pkg4",
        window=(32, 48),
        num_classes=4,
        in_channels=3,
        normalization=IMAGENET_RGB,
        save_torch=False,
    )
    code = main(["relabel", str(other), str(scenes / "leftImg8bit" / "val"), str(tmp_path / "out"), "--label-ids"])
    assert code == 2 and "--label-ids maps Cityscapes trainIds to labelIds" in capsys.readouterr().err


def test_jpeg_frames_in_a_plain_folder(tmp_path, torch_one_thread):
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.fromarray(np.full((24, 40, 3), 90, np.uint8)).save(folder / "cam0.jpg")
    relabeler = Relabeler.from_module(
        tiny_rgb_net(3), window=(16, 16), num_classes=3, in_channels=3, normalization=IMAGENET_RGB
    )
    summary = relabel_archive(relabeler, folder, tmp_path / "out", progress=False, save_overlay=True)
    assert summary["done"] == 1
    labels, _ = read_volume(tmp_path / "out" / "cam0.png")
    assert labels.shape == (1, 24, 40) and (tmp_path / "out" / "cam0_overlay.png").is_file()


# ------------------------------------------------------------------------------ the pieces
def test_rgb_normalisation_is_per_channel_on_0_255():
    frame = np.stack([np.full((1, 2, 3), v, np.float32) for v in (0.0, 116.28, 255.0)])
    got = normalize(frame, IMAGENET_RGB)
    np.testing.assert_allclose(got[:, 0, 0, 0], [-123.675 / 58.395, 0.0, (255 - 103.53) / 57.375], rtol=1e-6)
    with pytest.raises(ValueError, match="std > 0"):
        check_policy({"scheme": "rgb", "mean": [0.0], "std": [0.0]})
    with pytest.raises(ValueError, match="needs lists 'mean' and 'std'"):
        check_policy({"scheme": "rgb"})
    with pytest.raises(PackageError, match=r"'rgb' has 3 channel statistics for 1 input channel"):
        export_model(torch.nn.Conv2d(1, 2, 1), "unused", window=(8, 8), num_classes=2, normalization=IMAGENET_RGB)


def test_package_keeps_the_rgb_policy(package):
    assert load_package(package).normalization == IMAGENET_RGB
    assert json.loads((package / "model.json").read_text())["normalization"]["scheme"] == "rgb"


def test_label_map_of_the_relabeler(rng):
    net = tiny_rgb_net(3)
    frame = rng.integers(0, 256, (3, 1, 20, 30)).astype(np.float32)
    plain = Relabeler.from_module(net, window=(16, 16), num_classes=3, in_channels=3).relabel_volume(frame)
    mapped = Relabeler.from_module(
        net, window=(16, 16), num_classes=3, in_channels=3, label_map={0: 7, 2: 300}
    ).relabel_volume(frame)
    want = np.choose(plain.labels, [7, 1, 300])
    assert mapped.labels.dtype == np.uint16 and mapped.labels.tolist() == want.tolist()
    assert mapped.stats["label_counts"] == plain.stats["label_counts"]
    assert check_label_map([(2, 1), (0, 5)]) == [[0, 5], [2, 1]]
    with pytest.raises(ValueError, match="maps label 1 twice"):
        check_label_map([(1, 2), (1, 3)])
    with pytest.raises(ValueError, match=r"ints in \[0, 65535\]"):
        check_label_map({-1: 3})


def test_fingerprint_only_changes_with_a_map(package):
    pkg = load_package(package)
    assert run_fingerprint(pkg, {}) == run_fingerprint(pkg, {"label_map": None})
    assert run_fingerprint(pkg, {"label_map": {0: 7}}) == run_fingerprint(pkg, {"label_map": [(0, 7)]})
    assert run_fingerprint(pkg, {"label_map": {0: 7}}) != run_fingerprint(pkg, {})


def test_frame_overlay_draws_label_zero_with_a_palette():
    image = np.zeros((3, 2, 2), np.uint8)
    labels = np.array([[0, 13], [255, 1]], np.uint8)
    picture = frame_overlay(image, labels, ignore_index=255, palette=train_id_colors())
    assert picture[0, 0].tolist() == [64, 32, 64]  # road at 50%
    assert picture[1, 0].tolist() == [0, 0, 0]  # ignored: the frame itself
    plain = frame_overlay(image, labels, ignore_index=255)
    assert plain[0, 0].tolist() == [0, 0, 0]  # without a palette label 0 is background
    png = overlay_png(image[:, None], labels[None], palette=train_id_colors())
    assert np.asarray(Image.open(io.BytesIO(png))).shape == (2, 2, 3)
