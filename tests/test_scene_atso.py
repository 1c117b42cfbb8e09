"""ATSO on driving scenes (issue 24): the Cityscapes data form, the road-scene sampler, the ResNet
U-Net with encoder weights from a file, IoU in evaluation, every arm end to end on generated
frames, and ``atso-fast train`` -> export -> ``atso-fast relabel`` to label PNGs."""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
from test_scene_training import torchvision_resnet_state

from atso_fast.cli import main
from atso_fast.datasets.cityscapes import TRAIN_NAMES, cityscapes_frames, load_frame
from atso_fast.datasets.driving import make_driving_cityscapes
from atso_fast.engine import Relabeler
from atso_fast.io import read_volume
from atso_fast.package.normalize import IMAGENET_RGB, normalize
from atso_fast.train import ATSO, ATSOConfig, build_model, default_relabel_fn, load_data, run_methods
from atso_fast.train.config import reports_iou, resolve_storage
from atso_fast.train.resnet_unet import ResNetUNet
from atso_fast.train.scene_augment import SceneAugmentConfig, ScenePatches, to_pixels
from atso_fast.train.scene_data import scene_cases

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SKY, ROAD = 10, 0  # trainIds
TINY = {"name": "resnet_unet", "layers": 18, "decoder_channels": [8, 8, 8, 8, 8]}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Dataset A (day, 64 x 128) and dataset B (fog, 64 x 96, another seed)."""
    base = tmp_path_factory.mktemp("scenes")
    a = make_driving_cityscapes(base / "A", splits={"train": 5, "val": 2}, height=64, width=128, domain="day")
    b = make_driving_cityscapes(base / "B", splits={"train": 4, "val": 2}, height=64, width=96, domain="fog", seed=1)
    return a, b


def scene_config(data, **extra):
    return {
        "data": data,
        "num_classes": 19,
        "in_channels": 3,
        "spatial_dims": 2,
        "patch_size": [64, 64],
        "batch_size": 2,
        "model": dict(TINY),
        "warmup_steps": 2,
        "rounds": 1,
        "steps_per_round": 2,
        "progress": False,
        **extra,
    }


# ------------------------------------------------------------------------------ data
def test_cityscapes_form_reads_frames_as_cases(roots):
    a, _ = roots
    spec = {"cityscapes": str(a), "labelled": "train", "labelled_count": 2, "unlabelled": "train"}
    data = load_data(scene_config(spec))
    frames = {f.name: f for f in cityscapes_frames(a, "train")}
    assert len(data.labelled) == 2 and len(data.unlabelled) == 3 and len(data.val) == 2
    assert {c.name for c in data.labelled} | {c.name for c in data.unlabelled} == set(frames)
    assert data.normalization == IMAGENET_RGB and data.modality == "RGB"
    for case in data.labelled + data.unlabelled:
        rgb, train_ids = load_frame(frames[case.name])
        assert case.image.shape == (3, 1, 64, 128) and case.image.dtype == np.float32
        np.testing.assert_array_equal(case.image, normalize(rgb[:, None], IMAGENET_RGB))
        np.testing.assert_array_equal(case.label, train_ids[None])  # unlabelled: the hidden truth
    again = load_data(scene_config(spec))
    assert [c.name for c in again.labelled] == [c.name for c in data.labelled]


def test_transfer_form_and_unlabelled_frames_without_truth(roots, tmp_path):
    a, b = roots
    b_copy = shutil.copytree(b, tmp_path / "B")
    shutil.rmtree(b_copy / "gtFine" / "train")  # U without ground truth (as train_extra's coarse-only frames)
    data = load_data(
        scene_config(
            {
                "cityscapes": str(a),
                "labelled": "train",
                "unlabelled_root": str(b_copy),
                "unlabelled": "train",
                "val_root": str(b_copy),
                "val": "val",
            }
        )
    )
    assert len(data.labelled) == 5 and len(data.unlabelled) == 4 and len(data.val) == 2
    assert all(c.label is None and c.image.shape == (3, 1, 64, 96) for c in data.unlabelled)
    assert all(c.label.shape == (1, 64, 96) for c in data.val)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_classes": 2}, r"needs \{'num_classes': 19.*got \{'num_classes': 2\}"),
        ({"storage": "disk"}, "runs on memory storage"),
        ({"augment": {"flip": True}}, "never flipped upside down"),
        ({"data": {"cityscapes": "x", "labeled": "train"}}, r"unknown \['labeled'\]"),
        ({"data": {"cityscapes": "x", "labelled_count": 0}}, "labelled_count must be an int >= 1"),
        ({"model": {"name": "resnet_unet", "depth": 18}}, r"unknown \['depth'\]"),
        ({"model": {"name": "resnet_unet", "layers": 50}}, r"layers must be one of \[18, 34\]"),
        ({"model": {"name": "vit"}}, "model name must be one of"),
        ({"augment": {"kind": "scene", "crop": [32, 32]}}, r"the crop is the patch_size"),
        ({"augment": {"kind": "scene"}, "targets": "soft"}, "hard targets"),
    ],
)
def test_scene_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        ATSOConfig.from_dict({**scene_config({"cityscapes": "x"}), **change})


def test_scene_config_defaults_and_other_errors(roots):
    a, _ = roots
    config = ATSOConfig.from_dict(scene_config({"cityscapes": str(a)}, out_dir="run"))
    assert config.augment == {"kind": "scene"} and resolve_storage(config) == "memory" and reports_iou(config)
    assert not reports_iou(ATSOConfig()) and reports_iou(ATSOConfig(report_iou=True))
    with pytest.raises(ValueError, match="must not share frames"):
        load_data(scene_config({"cityscapes": str(a), "val": "train"}))
    with pytest.raises(ValueError, match="labelled_count 9 exceeds the 5 frames"):
        load_data(scene_config({"cityscapes": str(a), "labelled_count": 9}))
    with pytest.raises(ValueError, match="resnet_unet' is 2D"):
        ATSOConfig(model=dict(TINY), patch_size=(32, 32, 32))


# ------------------------------------------------------------------------------ sampling
def test_scene_patches_undo_the_normalisation_exactly_without_augmentation(roots):
    data = load_data(scene_config({"cityscapes": str(roots[0])}))
    images, labels = [c.image for c in data.labelled], [c.label for c in data.labelled]
    still = SceneAugmentConfig(crop=(64, 128), scale=(1.0, 1.0), flip=0.0, brightness=0.0, contrast=0.0, saturation=0.0)
    sampler = ScenePatches(images, labels, still, IMAGENET_RGB)
    rng = np.random.default_rng(0)
    for _ in range(3):
        index = int(copy.deepcopy(rng).integers(len(images)))  # the frame it draws first
        image, label = sampler.sample(rng)
        assert image.shape == (3, 64, 128) and image.dtype == np.float32
        np.testing.assert_array_equal(label, labels[index][0])
        np.testing.assert_allclose(image, images[index][:, 0], atol=1e-4)
    with pytest.raises(ValueError, match="normalization must be 'rgb'"):
        to_pixels(images[0], {"scheme": "zscore"})


def test_scene_batches_keep_the_sky_up_and_are_seeded(roots):
    """The labelled sampler of a scene run: random scale, crop and flips, but never upside down."""
    run = ATSO(scene_config({"cityscapes": str(roots[0])}, patch_size=[32, 64], method="supervised"))
    sampler = run.store.labelled_sampler()
    assert isinstance(sampler, ScenePatches)
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(30):
        image, label = sampler.sample(rng)
        assert image.shape == (3, 32, 64) and label.shape == (32, 64)
        rows = np.arange(32)[:, None]
        lowest_sky = np.where(label == SKY, rows, -1).max(axis=0)
        highest_road = np.where(label == ROAD, rows, 32).min(axis=0)
        both = (lowest_sky >= 0) & (highest_road < 32)
        assert (lowest_sky[both] < highest_road[both]).all()
        checked += int(both.sum())
    assert checked > 0
    a = sampler.sample(np.random.default_rng(5))
    b = sampler.sample(np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# ------------------------------------------------------------------------------ model
def test_resnet_unet_starts_from_the_encoder_file(roots, tmp_path):
    weights = torchvision_resnet_state(18)
    torch.save(weights, tmp_path / "r18.pth")
    config = ATSOConfig.from_dict(scene_config({"cityscapes": str(roots[0])}))
    fresh = build_model(config)
    pretrained = build_model(
        ATSOConfig.from_dict(
            scene_config({"cityscapes": str(roots[0])}, model={**TINY, "encoder_weights": str(tmp_path / "r18.pth")})
        )
    )
    assert isinstance(pretrained, ResNetUNet)
    for name, value in pretrained.encoder.state_dict().items():
        torch.testing.assert_close(value, weights[name])
    for (name, value), (_, other) in zip(pretrained.decoder.state_dict().items(), fresh.decoder.state_dict().items()):
        torch.testing.assert_close(value, other, msg=name)  # theta0: that encoder and a fresh decoder
    with pytest.raises(ValueError, match=r"patch_size \(48, 64\) must be multiples of 32"):
        build_model(ATSOConfig.from_dict(scene_config({"cityscapes": "x"}, patch_size=[48, 64])))
    plain = {"base_channels": 4, "depth": 2}
    unet = build_model(ATSOConfig(model=plain, patch_size=(8, 8, 8)))
    named = build_model(ATSOConfig(model={"name": "unet", **plain}, patch_size=(8, 8, 8)))
    for (name, value), (_, other) in zip(unet.state_dict().items(), named.state_dict().items()):
        torch.testing.assert_close(value, other, msg=name)


def test_default_relabel_fn_on_normalised_rgb_frames(roots):
    """The engine's sliding window on normalised 3-channel frames gives what a package-style
    Relabeler gives on the raw pictures (a frame of another size than the window, padded)."""
    config = ATSOConfig.from_dict(scene_config({"cityscapes": str(roots[0])}, normalization=IMAGENET_RGB))
    model = build_model(config).eval()
    raw = np.random.default_rng(0).integers(0, 256, (3, 1, 70, 100)).astype(np.float32)
    labels, confidence = default_relabel_fn(config)(model, [normalize(raw, IMAGENET_RGB)])[0]
    engine = Relabeler.from_module(model, window=(64, 64), num_classes=19, normalization=IMAGENET_RGB, in_channels=3)
    want = engine.relabel_volume(raw)
    assert labels.shape == (1, 70, 100) and confidence.dtype == np.uint8
    np.testing.assert_array_equal(labels, want.labels)


# ------------------------------------------------------------------------------ evaluation
def test_evaluate_reports_iou_against_a_hand_count(roots):
    """A relabeler that calls every pixel road: IoU(road) = road pixels / valid pixels, pooled;
    every other class present in the truth 0; absent ones NaN."""

    def all_road(model, volumes):
        return [(np.zeros(v.shape[1:], np.uint8), np.full(v.shape[1:], 255, np.uint8)) for v in volumes]

    run = ATSO(scene_config({"cityscapes": str(roots[0])}, method="supervised"), relabeler=all_road)
    truths = [c.label for c in run.store.val_cases]
    result = run.evaluate(run.store.val_cases)
    valid = sum(int((t != 255).sum()) for t in truths)
    road = sum(int((t == ROAD).sum()) for t in truths)
    present = sorted({int(v) for t in truths for v in np.unique(t) if v != 255})
    assert result["iou"][ROAD] == pytest.approx(road / valid)
    assert all(result["iou"][k] == 0.0 for k in present if k != ROAD)
    assert all(math.isnan(result["iou"][k]) for k in range(19) if k not in present)
    assert result["miou"] == pytest.approx(road / valid / len(present))
    per_image = [
        int((t == ROAD).sum()) / int((t != 255).sum()) / len({int(v) for v in np.unique(t)} - {255}) for t in truths
    ]
    assert result["miou_per_image"] == pytest.approx(np.mean(per_image))
    assert result["cases"]["hd95_mean"] == [] or all(math.isnan(v) for v in result["cases"]["hd95_mean"])
    row = run.validate()
    assert row["val_miou"] == result["miou"]
    np.testing.assert_array_equal(row["val_iou"], result["iou"])  # NaN where NaN


# ------------------------------------------------------------------------------ arms end to end
def test_every_arm_runs_on_scenes(roots):
    config = scene_config({"cityscapes": str(roots[0]), "labelled_count": 2, "unlabelled": "train"})
    arms = {
        "supervised": {"method": "supervised"},
        "self-training": {"method": "self-training"},
        "atso-reinit": {"method": "atso", "init": "reinit"},
        "atso": {"method": "atso"},
        "mean-teacher": {"method": "mean-teacher"},
    }
    runs = run_methods(config, arms)
    for name, run in runs.items():
        stages = [h["stage"] for h in run.history]
        assert stages == ["warm-up", "round", "consolidate"], name
        assert all(0.0 <= h["val_miou"] <= 1.0 and len(h["val_iou"]) == 19 for h in run.history), name
        assert run.config.class_names == list(TRAIN_NAMES) and run.config.augment == {"kind": "scene"}
    assert runs["atso-reinit"].history[1]["student_from"] == "theta0"
    assert runs["atso"].history[1]["relabelled"] in (["U1"], ["U2"])
    held = runs["atso"].history[1]["relabelled"][0]
    assert 0.0 <= runs["atso"].history[1]["monitor"][held]["pseudo_dice"] <= 1.0  # the hidden truth, monitored
    assert math.isfinite(runs["mean-teacher"].history[1]["train"]["consistency_loss"])
    assert runs["self-training"].history[1]["relabelled"] == ["U"]


# ------------------------------------------------------------------------------ the command line
@pytest.mark.slow
def test_train_export_relabel_on_a_cityscapes_folder(roots, tmp_path, capsys):
    """Transfer: labelled frames of A, unlabelled and validation frames of B; an encoder file;
    the exported package relabels B's validation split to one label PNG per frame."""
    a, b = roots
    torch.save(torchvision_resnet_state(18), tmp_path / "r18.pth")
    data = {
        "cityscapes": str(a),
        "labelled": "train",
        "unlabelled_root": str(b),
        "unlabelled": "train",
        "val_root": str(b),
        "val": "val",
    }
    config = scene_config(data, model={**TINY, "encoder_weights": "r18.pth"}, init="reinit", out_dir="run")
    config.pop("progress")
    (tmp_path / "config.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()))
    assert main(["train", str(tmp_path / "config.yaml"), "--log-level", "WARNING"]) == 0
    out = capsys.readouterr().out
    assert "val mIoU" in out and "(pooled over the validation images)" in out and "road " in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("val_miou" in r for r in rows)
    package = tmp_path / "run" / "model"
    meta = json.loads((package / "model.json").read_text())
    assert (meta["spatial_dims"], meta["in_channels"], meta["normalization"]) == (2, 3, IMAGENET_RGB)
    assert meta["class_names"] == list(TRAIN_NAMES)
    labels = tmp_path / "labels"
    assert main(["relabel", str(package), str(b / "leftImg8bit" / "val"), str(labels), "--quiet"]) == 0
    frames = cityscapes_frames(b, "val")
    written = sorted(p for p in labels.rglob("*.png"))
    assert len(written) == len(frames) == 2
    for frame in frames:
        label, _ = read_volume(labels / frame.city / frame.image.name)
        assert label.shape == (1, 64, 96) and label.dtype == np.uint8 and label.max() < 19


def test_scene_cases_for_a_test_split(roots):
    cases = scene_cases(roots[1], "val", IMAGENET_RGB)
    assert [c.image.shape for c in cases] == [(3, 1, 64, 96)] * 2 and all(c.label.shape == (1, 64, 96) for c in cases)
