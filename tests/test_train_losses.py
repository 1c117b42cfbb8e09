"""Loss and metric known answers; the ignore label contributes nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from atso_fast.train.augment import AugmentConfig
from atso_fast.train.data import PatchSampler
from atso_fast.train.losses import (
    confusion_counts,
    dice_ce_loss,
    dice_from_counts,
    dice_per_class,
    soft_dice_loss,
    soft_target_loss,
)
from atso_fast.train.monitor import PooledDice, PseudoLabelStats, foreground_change, pooled_dice
from atso_fast.train.trainer import MixedBatches, train_steps
from atso_fast.train.unet import UNet


def test_uniform_logits_known_answer():
    # 2 classes, zero logits -> p = 0.5 everywhere; voxel 2 is ignored.
    logits = torch.zeros(1, 2, 4)
    target = torch.tensor([[0, 1, 255, 1]])
    # CE = ln 2; class-1 Dice over 3 valid voxels = 2 * (0.5 * 2) / (1.5 + 2)
    expected = math.log(2) + 1 - 2 * 1.0 / 3.5
    assert float(dice_ce_loss(logits, target)) == pytest.approx(expected, rel=1e-5)  # smooth=1e-5


def test_ignored_voxels_are_excluded_exactly():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, generator=gen)
    target = torch.randint(0, 3, (2, 6, 5), generator=gen)
    ignore = torch.rand(2, 6, 5, generator=gen) < 0.4
    target[ignore] = 255
    base = dice_ce_loss(logits, target)
    # Whatever the network says at ignored voxels changes neither the loss nor its gradient elsewhere
    noisy = logits.clone()
    noisy[ignore.unsqueeze(1).expand_as(noisy)] = 50.0
    assert float(dice_ce_loss(noisy, target)) == pytest.approx(float(base), rel=1e-6)
    x = logits.clone().requires_grad_(True)
    dice_ce_loss(x, target).backward()
    assert float(x.grad[ignore.unsqueeze(1).expand_as(x)].abs().max()) == 0.0
    # ... and equals the loss computed on the valid voxels alone (flattened into one "image")
    keep = ~ignore
    flat_logits = logits.movedim(1, -1)[keep].T.unsqueeze(0)  # (1, C, V)
    flat_target = target[keep].unsqueeze(0)  # (1, V)
    assert float(dice_ce_loss(flat_logits, flat_target)) == pytest.approx(float(base), rel=1e-5)


def test_all_ignored_gives_zero_without_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = dice_ce_loss(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(logits.grad).all()


def test_perfect_prediction_has_near_zero_dice_loss():
    target = torch.tensor([[0, 1, 2, 2, 1]])
    logits = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 30
    assert float(soft_dice_loss(logits, target)) < 1e-6
    assert float(dice_ce_loss(logits, target)) < 1e-6


def test_loss_validation():
    with pytest.raises(ValueError, match="target"):
        dice_ce_loss(torch.zeros(1, 2, 4), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="foreground"):
        soft_dice_loss(torch.zeros(1, 1, 4), torch.zeros(1, 4, dtype=torch.long))


def test_dice_per_class_table():
    pred = np.array([0, 1, 1, 2, 0, 0])
    truth = np.array([0, 1, 2, 2, 0, 1])
    d = dice_per_class(pred, truth, 4)
    # class 0: pred {0,4,5} truth {0,4}: 2*2/5; class 1: pred {1,2} truth {1,5}: 2*1/4
    # class 2: pred {3} truth {2,3}: 2*1/3; class 3 absent from both: NaN
    np.testing.assert_allclose(d[:3], [0.8, 0.5, 2 / 3])
    assert np.isnan(d[3])
    # voxels 2 and 5 ignored: pred [0, 1, 2, 0] vs truth [0, 1, 2, 1]
    ignored = dice_per_class(pred, np.array([0, 1, 255, 2, 1, 255]), 4, ignore_index=255)
    np.testing.assert_allclose(ignored[:3], [2 / 3, 2 / 3, 1.0])
    with pytest.raises(ValueError, match="shapes"):
        dice_per_class(pred, truth[:3], 4)


# ----------------------------------------------------------------------------- soft targets
def test_soft_target_loss_equals_hard_loss_for_one_hot_targets():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, 6, generator=gen)
    target = torch.randint(0, 4, (2, 5, 6), generator=gen)
    target[0, :2] = 255
    onehot = torch.nn.functional.one_hot(torch.where(target == 255, 0, target), 4).movedim(-1, 1).float()
    onehot *= (target != 255).unsqueeze(1)  # ignored voxels: all-zero rows
    assert float(soft_target_loss(logits, onehot)) == pytest.approx(float(dice_ce_loss(logits, target)), rel=1e-5)
    # gradients agree as well
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    soft_target_loss(a, onehot).backward()
    dice_ce_loss(b, target).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_soft_target_loss_prefers_the_teacher_distribution():
    teacher = torch.softmax(torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(2)), 1)
    matched = soft_target_loss(teacher.log(), teacher)
    assert float(matched) < float(soft_target_loss(torch.zeros(1, 3, 8), teacher))
    with pytest.raises(ValueError, match="soft targets"):
        soft_target_loss(torch.zeros(1, 3, 8), torch.zeros(1, 3, 7))


def test_mixed_batches_soft_targets_and_pseudo_part():
    lab_img = np.zeros((1, 1, 4, 4), np.float32)
    lab = np.ones((1, 4, 4), np.uint8)
    probs = np.zeros((3, 1, 4, 4), np.float32)
    probs[2] = 0.75
    probs[0] = 0.25
    pse_label = np.full((1, 4, 4), 2, np.uint8)
    pse_label[0, 0, 0] = 255  # below the confidence threshold
    pse_img = np.concatenate([np.full((1, 1, 4, 4), 7.0, np.float32), probs])
    kw = {"patch_size": (4, 4), "num_classes": 3}
    batches = MixedBatches(
        PatchSampler([lab_img], [lab], **kw),
        PatchSampler([pse_img], [pse_label], **kw),
        4,
        labelled_ratio=0.5,
        soft_channels=3,
        augment=AugmentConfig(p_intensity=1.0, p_noise=1.0, scale=(2.0, 2.0)),
    )
    x, y = batches(np.random.default_rng(0))
    assert x.shape == (4, 1, 4, 4) and y.shape == (4, 3, 4, 4) and batches.last_labelled == 2
    np.testing.assert_array_equal(y[:2, 1], 1.0)  # labelled: one-hot
    assert float(np.abs(x[2:] - 7.0).min()) > 1.0  # image intensities were augmented ...
    ignored = y[2:].sum(1) == 0
    assert ignored.sum() == 2  # ... the thresholded voxel (one per pseudo sample) counts for nothing ...
    np.testing.assert_allclose(y[2:][:, 2][~ignored], 0.75)  # ... and the targets were left alone
    only = MixedBatches(PatchSampler([lab_img], [lab], **kw), None, 4, labelled_ratio=0.5, labelled_only=True)
    assert only(np.random.default_rng(0))[0].shape[0] == 2


def test_train_steps_reports_the_pseudo_part_loss():
    kw = {"patch_size": (8, 8), "num_classes": 2}
    img = np.random.default_rng(0).normal(size=(1, 1, 8, 8)).astype(np.float32)
    lab = (img[0] > 0).astype(np.uint8)
    batches = MixedBatches(PatchSampler([img], [lab], **kw), PatchSampler([img], [1 - lab], **kw), 4)
    net = UNet(1, 2, spatial_dims=2, base_channels=2, depth=1)
    stats = train_steps(net, batches, steps=3, lr=1e-3, rng=np.random.default_rng(0))
    assert stats["pseudo_loss"] > 0 and math.isfinite(stats["pseudo_first_loss"])
    alone = train_steps(
        net, MixedBatches(PatchSampler([img], [lab], **kw), None, 4), steps=2, lr=1e-3, rng=np.random.default_rng(0)
    )
    assert math.isnan(alone["pseudo_loss"]) and alone["loss"] > 0


# ----------------------------------------------------------------------------- pooled metrics
def test_confusion_counts_and_pooled_dice_known_answers():
    pred = np.array([0, 1, 1, 2, 0, 0])
    truth = np.array([0, 1, 2, 2, 0, 1])
    counts = confusion_counts(pred, truth, 4)
    np.testing.assert_array_equal(counts, [[2, 1, 0], [1, 1, 1], [1, 0, 1], [0, 0, 0]])
    np.testing.assert_allclose(dice_from_counts(counts)[:3], dice_per_class(pred, truth, 4)[:3])
    # pooling: class 1 only in the second case; per-case mean would score case 1 as NaN/absent,
    # pooled Dice weighs voxels: 2*TP / (2*TP + FP + FN) over both
    per_class, mean_fg = pooled_dice([np.array([0, 0]), np.array([1, 0])], [np.array([0, 0]), np.array([1, 1])], 2)
    assert per_class[1] == pytest.approx(2 / 3) and mean_fg == pytest.approx(2 / 3)
    assert pooled_dice([], [], 3) == ([], pytest.approx(float("nan"), nan_ok=True))
    with pytest.raises(ValueError, match="as many"):
        pooled_dice([pred], [], 3)


def test_foreground_change_ignores_background():
    old = [np.array([0, 0, 0, 0, 1, 1, 2, 0])]
    new = [np.array([0, 0, 0, 0, 1, 2, 2, 1])]
    # foreground in either: voxels 4..7 (4); changed among them: 5 and 7
    assert foreground_change(old, new) == pytest.approx(0.5)
    assert math.isnan(foreground_change([np.zeros(5)], [np.zeros(5)]))  # no foreground at all
    assert foreground_change([np.array([1, 255])], [np.array([1, 2])], ignore_index=255) == 0.0


def test_streaming_monitors_equal_the_one_shot_ones():
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 3, size=(4, 5, 6)) for _ in range(3)]
    truths = [rng.integers(0, 3, size=(4, 5, 6)) for _ in range(3)]
    truths[1][0] = 255
    acc = PooledDice(3, ignore_index=255)
    for p, t in zip(preds, truths):
        acc.add(p, t)
    assert acc.result() == pooled_dice(preds, truths, 3, ignore_index=255)
    assert PooledDice(3).result() == ([], pytest.approx(float("nan"), nan_ok=True))


def test_pseudo_label_stats_known_answer():
    """Two cases of 4 voxels; confidence below 0.5 (127.5) or the ignore label count as ignored."""
    stats = PseudoLabelStats(3, ignore_index=255, threshold=0.5)
    new = [np.array([0, 1, 1, 2]), np.array([0, 0, 2, 255])]
    conf = [np.array([255, 100, 200, 255]), np.array([255, 255, 50, 0])]
    old = [np.array([0, 1, 2, 2]), np.array([0, 1, 2, 2])]
    truth = [np.array([0, 1, 1, 2]), np.array([0, 0, 2, 2])]
    for n, c, o, t in zip(new, conf, old, truth):
        stats.add(n, c, previous=o, m0=o, truth=t)
    result = stats.result()
    assert result["changed_fraction"] == 3 / 8  # voxel 2 of case 1, voxels 1 and 3 of case 2
    # foreground in either (ignored voxels left out): case 1 voxels 1-3, case 2 voxels 1-2; changed: 2 of 5
    assert result["changed_fg"] == result["changed_fg_m0"] == pytest.approx(2 / 5)
    assert result["mean_confidence"] == pytest.approx(sum(map(int, np.concatenate(conf))) / (255 * 8))
    assert result["ignored_fraction"] == 3 / 8  # 100, 50, and the ignore label (also conf 0)
    assert result["pseudo_dice"] == pooled_dice(new, truth, 3, ignore_index=255)[1] == 1.0
    assert result["pseudo_dice_before"] == pooled_dice(old, truth, 3, ignore_index=255)[1]
    first = PseudoLabelStats(3, ignore_index=255, threshold=0.0)  # the warm-up: no previous labels, no truth
    first.add(new[0], conf[0])
    got = first.result()
    assert math.isnan(got["changed_fraction"]) and math.isnan(got["changed_fg_m0"]) and "pseudo_dice" not in got
