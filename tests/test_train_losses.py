"""Loss and metric known answers; the ignore label contributes nothing."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from atso_fast.train.losses import dice_ce_loss, dice_per_class, soft_dice_loss


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
