"""U-Net, patch sampling, augmentation and the training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atso_fast.train.augment import AugmentConfig, augment_sample
from atso_fast.train.data import (
    PatchSampler,
    crop_with_padding,
    data_from_arrays,
    load_raw,
)
from atso_fast.train.trainer import MixedBatches, OptimConfig, poly_lr, train_steps
from atso_fast.train.unet import UNet

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.mark.parametrize("dims, shape", [(3, (2, 1, 8, 16, 12)), (2, (3, 1, 16, 20))])
def test_unet_shapes(dims, shape):
    net = UNet(1, 4, spatial_dims=dims, base_channels=4, depth=3)
    assert net.divisor == 4
    assert net(torch.zeros(shape)).shape == (shape[0], 4, *shape[2:])


def test_unet_validation():
    with pytest.raises(ValueError, match="spatial_dims"):
        UNet(spatial_dims=1)
    with pytest.raises(ValueError, match="depth"):
        UNet(depth=0)
    net = UNet(2, 3, base_channels=2, depth=2)
    with pytest.raises(ValueError, match="multiples of 2"):
        net(torch.zeros(1, 2, 4, 4, 5))
    with pytest.raises(ValueError, match="expects"):
        net(torch.zeros(1, 1, 4, 4, 4))


def test_crop_with_padding_known_answer():
    a = np.arange(12).reshape(1, 3, 4)
    out = crop_with_padding(a, (-1, 2), (3, 3), fill=-1)
    np.testing.assert_array_equal(out[0], [[-1, -1, -1], [2, 3, -1], [6, 7, -1]])
    assert crop_with_padding(a, (5, 5), (2, 2), fill=9).tolist() == [[[9, 9], [9, 9]]]


def test_patch_sampler_foreground_oversampling_finds_a_tiny_class():
    label = np.zeros((16, 32, 32), np.uint8)
    label[3, 5, 7] = 2  # one voxel of class 2
    image = np.zeros((1, 16, 32, 32), np.float32)
    sampler = PatchSampler([image], [label], (4, 8, 8), num_classes=3, foreground_oversample=1.0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        _, lab = sampler.sample(rng)
        assert lab.shape == (4, 8, 8) and (lab == 2).sum() == 1
    uniform = PatchSampler([image], [label], (4, 8, 8), num_classes=3, foreground_oversample=0.0)
    hits = sum(int((uniform.sample(rng)[1] == 2).any()) for _ in range(50))
    assert hits < 10


def test_patch_sampler_pads_small_volumes_and_slices_2d():
    image = np.ones((2, 3, 5, 6), np.float32)
    label = np.ones((3, 5, 6), np.uint8)
    rng = np.random.default_rng(1)
    img, lab = PatchSampler([image], [label], (4, 8, 8), num_classes=2, ignore_index=255).sample(rng)
    assert img.shape == (2, 4, 8, 8) and lab.shape == (4, 8, 8)
    pad = 4 * 8 * 8 - 3 * 5 * 6
    assert (lab == 255).sum() == pad and (img == 0).sum() == 2 * pad  # padding: label ignored, image 0
    img2, lab2 = PatchSampler([image], [label], (4, 4), num_classes=2).sample(rng)
    assert img2.shape == (2, 4, 4) and lab2.shape == (4, 4)
    with pytest.raises(ValueError, match="as many labels"):
        PatchSampler([image], [], (4, 4), num_classes=2)


def test_augmentation_keeps_image_and_label_aligned():
    rng = np.random.default_rng(2)
    label = rng.integers(0, 4, (4, 6, 6)).astype(np.uint8)
    image = label[None].astype(np.float32)
    cfg = AugmentConfig(p_intensity=0.0, p_noise=0.0)
    for _ in range(10):
        img, lab = augment_sample(image, label, rng, cfg)
        np.testing.assert_array_equal(img[0], lab)
        assert img.flags.c_contiguous and lab.flags.c_contiguous
    img, _ = augment_sample(image, label, rng, AugmentConfig(flip=False, rot90=False, p_intensity=1.0, p_noise=1.0))
    assert not np.array_equal(img[0], label)
    with pytest.raises(ValueError, match="lo <= hi"):
        AugmentConfig(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="unknown augment"):
        AugmentConfig.from_value({"elastic": True})


def test_poly_lr_and_optim_validation():
    assert poly_lr(1.0, 0, 10) == 1.0 and poly_lr(1.0, 10, 10) == 0.0
    assert poly_lr(2.0, 5, 10, exponent=1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="optimizer"):
        OptimConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="optim must be"):
        OptimConfig.from_value({"lr": 1})


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_train_steps_learns_a_trivial_task(optimizer):
    """Label = (intensity > 0): a few steps must cut the loss clearly."""
    rng = np.random.default_rng(3)
    images = [rng.normal(size=(1, 8, 16, 16)).astype(np.float32) for _ in range(2)]
    labels = [(im[0] > 0).astype(np.uint8) for im in images]
    sampler = PatchSampler(images, labels, (8, 16, 16), num_classes=2)
    batches = MixedBatches(sampler, None, 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = UNet(1, 2, base_channels=4, depth=2)
    lr = 1e-2 if optimizer == "adamw" else 1e-1
    first = train_steps(
        net,
        batches,
        steps=3,
        lr=lr,
        rng=np.random.default_rng(0),
        optim=OptimConfig(optimizer=optimizer, schedule="constant"),
    )
    later = train_steps(
        net, batches, steps=25, lr=lr, rng=np.random.default_rng(1), optim=OptimConfig(optimizer=optimizer)
    )
    assert later["last_loss"] < 0.6 * first["loss"]
    with pytest.raises(ValueError, match="steps"):
        train_steps(net, batches, steps=-1, lr=lr, rng=np.random.default_rng(0))


def test_mixed_batches_ratio():
    lab = PatchSampler([np.zeros((1, 2, 4, 4), np.float32)], [np.zeros((2, 4, 4), np.uint8)], (2, 4, 4), num_classes=2)
    pseudo = PatchSampler([np.ones((1, 2, 4, 4), np.float32)], [np.ones((2, 4, 4), np.uint8)], (2, 4, 4), num_classes=2)
    rng = np.random.default_rng(4)
    x, y = MixedBatches(lab, pseudo, 4, labelled_ratio=0.25)(rng)
    assert x.shape == (4, 1, 2, 4, 4) and y.dtype == np.int64
    assert [int(v) for v in x[:, 0, 0, 0, 0]] == [0, 1, 1, 1]
    x, _ = MixedBatches(lab, pseudo, 3, labelled_ratio=1.0)(rng)
    assert float(x.max()) == 0.0


def test_data_from_arrays_and_list_files(tmp_path):
    from atso_fast.datasets.synthetic import make_archive, make_phantoms

    ph = make_phantoms(4, (4, 8, 8), seed=0)
    data = data_from_arrays(ph[:1], [ph[1][0], (ph[2][0], ph[2][1])], ph[3:], normalization="ct")
    assert data.labelled[0].image.shape == (1, 4, 8, 8) and data.labelled[0].image.dtype == np.float32
    assert data.normalization["scheme"] == "ct" and data.unlabelled[1].label is not None
    with pytest.raises(ValueError, match="label shape"):
        data_from_arrays([(ph[0][0], ph[0][1][:2])])
    archive = make_archive(tmp_path / "arc", 3, num_labelled=1, num_val=1, shape=(4, 8, 8), fmt="npy")
    folder, modality = load_raw(archive["root"])
    assert [len(folder[k]) for k in ("labelled", "unlabelled", "val")] == [1, 2, 1] and modality == "CT"
    listing = tmp_path / "list.yaml"
    listing.write_text(
        f"labelled:\n  - image: {archive['labelled'][0]['image']}\n"
        f"    label: {archive['labelled'][0]['label']}\n"
        f"unlabelled:\n  - {archive['unlabelled'][0]['image']}\n"
    )
    listed, _ = load_raw(listing)
    np.testing.assert_array_equal(listed["labelled"][0].image, folder["labelled"][0].image)
    assert len(listed["unlabelled"]) == 1 and listed["val"] == []
    with pytest.raises(ValueError, match="not found"):
        load_raw(tmp_path / "missing")
