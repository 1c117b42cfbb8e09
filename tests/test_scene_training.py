"""Training pieces for driving scenes (issue 24): IoU against a hand-computed example, road-scene
augmentation (never upside down), and the ResNet U-Net loading a torchvision-layout state_dict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from atso_fast.engine import Relabeler
from atso_fast.train.iou import IoUMeter, confusion_matrix, iou_per_class, mean_iou
from atso_fast.train.resnet_unet import ResNetEncoder, ResNetUNet, load_encoder
from atso_fast.train.scene_augment import SceneAugmentConfig, augment_scene


# ------------------------------------------------------------------------------ IoU
def test_iou_hand_computed():
    pred = np.array([[0, 0, 1], [1, 2, 2]])
    target = np.array([[0, 1, 1], [1, 2, 255]])
    # class 0: TP 1, FP 1 (pixel (0, 1)), FN 0 -> 1/2; class 1: TP 2, FN 1 -> 2/3; class 2: TP 1 -> 1
    # (the prediction 2 on the ignored pixel counts nowhere)
    ious = iou_per_class(confusion_matrix(pred, target, 3))
    np.testing.assert_allclose(ious, [1 / 2, 2 / 3, 1.0])
    assert mean_iou(ious) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)


def test_per_image_and_pooled_differ_as_they_should():
    meter = IoUMeter(num_classes=2)
    meter.update(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 0]))  # class 1 absent: image mIoU 1
    meter.update(np.array([0, 1, 1, 1]), np.array([1, 1, 1, 1]))  # class 0: 0/1, class 1: 3/4
    result = meter.result()
    assert result["per_image"]["mious"] == [1.0, pytest.approx(0.375)]
    assert result["per_image"]["miou"] == pytest.approx((1 + 0.375) / 2)
    # pooled: class 0 TP 4, FP 1 -> 4/5; class 1 TP 3, FN 1 -> 3/4
    assert result["pooled"]["iou"] == [pytest.approx(0.8), pytest.approx(0.75)]
    assert result["pooled"]["miou"] == pytest.approx(0.775)
    assert math.isnan(meter.result()["per_image"]["ious"][0][1])


def test_a_prediction_that_is_no_class_is_a_miss():
    ious = iou_per_class(confusion_matrix(np.array([255, 0]), np.array([0, 0]), 2))
    assert ious[0] == pytest.approx(0.5) and math.isnan(ious[1])
    with pytest.raises(ValueError, match=r"target holds \[7\]"):
        confusion_matrix(np.array([0]), np.array([7]), 2)
    with pytest.raises(ValueError, match="one shape"):
        confusion_matrix(np.zeros(2, int), np.zeros(3, int), 2)
    assert math.isnan(mean_iou(np.array([np.nan])))


# ------------------------------------------------------------------------------ augmentation
def street(h: int = 40, w: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Sky (10) above road (0); the left third of the road is sidewalk (1)."""
    labels = np.zeros((h, w), np.uint8)
    labels[: h // 2] = 10
    labels[h // 2 :, : w // 3] = 1
    image = np.stack([labels * 20, labels * 10, 255 - labels * 20]).astype(np.uint8)
    return image, labels


def test_augment_is_seeded_and_sized():
    image, labels = street()
    config = SceneAugmentConfig(crop=(32, 48))
    a = augment_scene(image, labels, np.random.default_rng(3), config)
    b = augment_scene(image, labels, np.random.default_rng(3), config)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == (3, 32, 48) and a[0].dtype == np.float32 and a[1].shape == (32, 48) and a[1].dtype == np.uint8
    assert 0 <= a[0].min() and a[0].max() <= 255


def test_augment_never_turns_the_street_upside_down_but_flips_it_sideways():
    image, labels = street()
    config = SceneAugmentConfig(crop=(48, 64), scale=(0.5, 2.0))
    sidewalk_left = set()
    padded = False
    for seed in range(40):
        _, out = augment_scene(image, labels, np.random.default_rng(seed), config)
        valid = out != 255
        padded |= not valid.all()
        rows = np.arange(out.shape[0])[:, None]
        lowest_sky = np.where(valid & (out == 10), rows, -1).max(axis=0)
        highest_ground = np.where(valid & (out != 10), rows, out.shape[0]).min(axis=0)
        assert (lowest_sky < highest_ground).all(), f"seed {seed}: sky below the ground"
        walk = np.argwhere(out == 1)
        if walk.size and (out == 0).any():
            sidewalk_left.add(bool(walk[:, 1].mean() < np.argwhere(out == 0)[:, 1].mean()))
    assert sidewalk_left == {True, False} and padded


def test_augment_refuses_bad_input():
    with pytest.raises(ValueError, match=r"expected image \(3, H, W\)"):
        augment_scene(np.zeros((4, 4)), np.zeros((4, 4)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="scale must be a range"):
        SceneAugmentConfig(scale=(2.0, 1.0))


# ------------------------------------------------------------------------------ ResNet U-Net
def torchvision_resnet_state(depth: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A state_dict with the key names, order and shapes of torchvision's ``resnet18``/``resnet34``
    (written out from its layout here: torchvision does not import beside this torch); random
    values (``device="meta"``: shapes only)."""
    gen = torch.Generator().manual_seed(depth)
    state: dict[str, torch.Tensor] = {}

    def conv(name, *shape):
        state[name] = torch.empty(*shape, device="meta") if device == "meta" else torch.randn(*shape, generator=gen)

    def bn(name, n):
        for part in ("weight", "bias", "running_mean"):
            conv(f"{name}.{part}", n)
        state[f"{name}.running_var"] = state[f"{name}.running_mean"].abs() + 0.5
        state[f"{name}.num_batches_tracked"] = torch.tensor(0, device=device)

    conv("conv1.weight", 64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for k, (blocks, planes) in enumerate(zip({18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}[depth], (64, 128, 256, 512)), 1):
        for b in range(blocks):
            p, cin = f"layer{k}.{b}", inplanes if b == 0 else planes
            conv(f"{p}.conv1.weight", planes, cin, 3, 3)
            bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2.weight", planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            if b == 0 and k > 1:
                conv(f"{p}.downsample.0.weight", planes, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes)
        inplanes = planes
    conv("fc.weight", 1000, 512)
    conv("fc.bias", 1000)
    return state


@pytest.mark.parametrize("depth, keys", [(18, 122), (34, 218)])
def test_encoder_has_torchvisions_names_and_shapes(depth, keys):
    state = torchvision_resnet_state(depth, device="meta")
    assert len(state) == keys  # torchvision's resnet18 / resnet34 state_dict sizes
    own = ResNetEncoder(depth).state_dict()
    assert list(own) == [k for k in state if not k.startswith("fc.")]
    assert all(own[k].shape == state[k].shape for k in own)


def test_encoder_loads_torchvision_weights(tmp_path):
    state = torchvision_resnet_state(18)
    torch.save(state, tmp_path / "resnet18.pth")
    encoder = load_encoder(ResNetEncoder(18), tmp_path / "resnet18.pth")
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(value, state[name])


def test_load_encoder_names_what_does_not_fit(tmp_path):
    state = torchvision_resnet_state(18)
    state["layer2.0.conv1.weight"] = torch.zeros(128, 32, 3, 3)
    del state["layer4.1.bn2.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(
        ValueError,
        match=r"bad\.pth: not a ResNet-18 .*missing: layer4\.1\.bn2\.bias; other shape: "
        r"layer2\.0\.conv1\.weight \(128, 32, 3, 3\) \(encoder: \(128, 64, 3, 3\)\)",
    ):
        load_encoder(ResNetEncoder(18), tmp_path / "bad.pth")
    torch.save(torchvision_resnet_state(18), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"not a ResNet-34 .*missing: layer1\.2\.bn1\.bias"):
        load_encoder(ResNetEncoder(34), tmp_path / "r18.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pth: not a loadable torch state_dict"):
        load_encoder(ResNetEncoder(18), tmp_path / "junk.pth")


def test_resnet_unet_shapes_and_relabels(torch_one_thread):
    torch.manual_seed(0)
    net = ResNetUNet(5).eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 64, 96)).shape == (2, 5, 64, 96)
        with pytest.raises(ValueError, match="multiples of 32"):
            net(torch.zeros(1, 3, 60, 64))
    frame = np.random.default_rng(0).integers(0, 256, (3, 1, 70, 100)).astype(np.float32)
    result = Relabeler.from_module(net, window=(64, 64), num_classes=5, in_channels=3).relabel_volume(frame)
    assert result.labels.shape == (1, 70, 100)


@pytest.mark.slow
def test_resnet_unet_package_runs_the_same_on_every_cpu_runtime(tmp_path, torch_one_thread):
    """ONNX export (+ model.pt2) of the 2D network, and OpenVINO, ONNX Runtime and torch agree."""
    from atso_fast.package import export_model
    from atso_fast.package.normalize import IMAGENET_RGB

    pytest.importorskip("openvino")
    torch.manual_seed(0)
    package = export_model(
        ResNetUNet(19).eval(),
        tmp_path / "pkg",
        window=(64, 64),
        num_classes=19,
        in_channels=3,
        normalization=IMAGENET_RGB,
    )
    assert (package / "model.pt2").is_file()
    frame = np.random.default_rng(0).integers(0, 256, (3, 1, 80, 100)).astype(np.float32)
    labels = {
        rt: Relabeler(package, runtime=rt).relabel_volume(frame).labels for rt in ("onnxruntime", "openvino", "torch")
    }
    assert labels["onnxruntime"].shape == (1, 80, 100)
    for rt in ("openvino", "torch"):
        assert (labels[rt] == labels["onnxruntime"]).mean() > 0.999, rt
