"""Mean Teacher: EMA teacher, consistency ramp and term, MT batches, and the trainer's consistency path."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from atso_fast.train.augment import AugmentConfig
from atso_fast.train.data import PatchSampler
from atso_fast.train.mean_teacher import (
    MeanTeacher,
    MeanTeacherConfig,
    ema_alpha,
    mean_teacher_batches,
    sigmoid_rampup,
    unlabelled_sampler,
)
from atso_fast.train.trainer import MixedBatches, train_loader, train_steps
from atso_fast.train.unet import UNet

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PATCH = (16, 16)


def _net() -> UNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet(1, 2, spatial_dims=2, base_channels=4, depth=2)


def _volumes(seed: int, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` random ``(1, 3, 20, 20)`` images labelled ``intensity > 0``."""
    rng = np.random.default_rng(seed)
    images = [rng.normal(size=(1, 3, 20, 20)).astype(np.float32) for _ in range(n)]
    return images, [(im[0] > 0).astype(np.uint8) for im in images]


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.state_dict().values()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.register_buffer("count", torch.tensor([5.0]))


def test_ema_alpha_and_update_known_answer():
    assert ema_alpha(0, 0.99) == 0.0 and ema_alpha(9, 0.99) == pytest.approx(0.9) and ema_alpha(10**4, 0.99) == 0.99
    student = _Toy()
    mt = MeanTeacher(student, MeanTeacherConfig(ema_decay=0.99), total_steps=1000, step_offset=100)
    assert not any(p.requires_grad for p in mt.teacher.parameters()) and student.w.requires_grad
    with torch.no_grad():
        student.w.copy_(torch.tensor([2.0, 0.0]))
        student.count.fill_(7.0)
    mt.update(student, 99)  # global step 199: alpha = min(1 - 1/200, 0.99) = 0.99
    torch.testing.assert_close(mt.teacher.w, torch.tensor([0.99 * 1 + 0.01 * 2, 0.99 * -2 + 0.0]))
    assert float(mt.teacher.count) == 7.0 and mt.state_dict()["step"] == 200
    fresh = MeanTeacher(
        student,
        MeanTeacherConfig(),
        total_steps=10,
        teacher_state={"w": torch.tensor([4.0, 4.0]), "count": torch.tensor([0.0])},
    )
    fresh.update(student, 9)  # global step 9: alpha = 0.9
    torch.testing.assert_close(fresh.teacher.w, torch.tensor([0.9 * 4 + 0.1 * 2, 0.9 * 4 + 0.0]))
    fresh.update(student, 0)  # global step 0: alpha = 0, the teacher becomes the student
    torch.testing.assert_close(fresh.teacher.w, student.w.detach())


def test_weight_ramp():
    assert sigmoid_rampup(0, 40) == pytest.approx(math.exp(-5)) and sigmoid_rampup(20, 40) == pytest.approx(
        math.exp(-1.25)
    )
    assert sigmoid_rampup(40, 40) == 1.0 and sigmoid_rampup(1000, 40) == 1.0 and sigmoid_rampup(0, 0) == 1.0
    cfg = MeanTeacherConfig(consistency=0.3, rampup=0.4)
    mt = MeanTeacher(_Toy(), cfg, total_steps=100)  # ramp over 40 steps
    assert mt.weight(0) == pytest.approx(0.3 * math.exp(-5))
    assert mt.weight(40) == pytest.approx(0.3) and mt.weight(99) == pytest.approx(0.3)
    later = MeanTeacher(_Toy(), cfg, total_steps=100, step_offset=20)
    assert later.weight(0) == pytest.approx(mt.weight(20))
    assert MeanTeacher(_Toy(), MeanTeacherConfig(rampup=0.0), total_steps=100).weight(0) == pytest.approx(0.1)


def test_config_and_argument_validation():
    assert MeanTeacherConfig.from_value(None) == MeanTeacherConfig()
    cfg = MeanTeacherConfig.from_value({"ema_decay": 0.9, "noise": 0.0})
    assert MeanTeacherConfig.from_value(cfg.to_dict()) == cfg and cfg.consistency == 0.1
    with pytest.raises(ValueError, match="mean teacher settings"):
        MeanTeacherConfig.from_value({"decay": 0.9})
    with pytest.raises(ValueError, match="ema_decay"):
        MeanTeacherConfig(ema_decay=1.5)
    with pytest.raises(ValueError, match="noise"):
        MeanTeacherConfig(noise=-0.1)
    with pytest.raises(ValueError, match="total_steps"):
        MeanTeacher(_Toy(), MeanTeacherConfig(), total_steps=-1)


def test_consistency_term_known_answers():
    net = _net()
    x = torch.randn(3, 1, *PATCH, generator=torch.Generator().manual_seed(1))
    logits = net(x)
    mt = MeanTeacher(net, MeanTeacherConfig(rampup=0.0), total_steps=10)
    gen = torch.Generator()
    assert float(mt.loss(x, logits, 3, 0, gen)) == 0.0  # every sample labelled
    quiet = MeanTeacher(net, MeanTeacherConfig(rampup=0.0, noise=0.0), total_steps=10)
    assert float(quiet.loss(x, logits, 1, 0, gen).detach()) < 1e-12  # teacher == student, no noise
    # an identity "network": the term is weight * mean((softmax(x) - softmax(x + clamped noise)) ** 2)
    ident = MeanTeacher(nn.Identity(), MeanTeacherConfig(rampup=0.0, noise=0.5, consistency=2.0), total_steps=10)
    x2 = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    got = ident.loss(x2, x2, 1, 0, torch.Generator().manual_seed(7))
    noise = torch.clamp(torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(7)) * 0.5, -1.0, 1.0)
    want = 2.0 * torch.mean((torch.softmax(x2[1:], 1) - torch.softmax(x2[1:] + noise, 1)) ** 2)
    torch.testing.assert_close(got, want)
    assert float(got) > 0


def test_state_dict_round_trip_is_weights_only_safe():
    net = _net()
    mt = MeanTeacher(net, MeanTeacherConfig(ema_decay=0.9), total_steps=50, step_offset=3)
    mt.update(net, 4)
    buf = io.BytesIO()
    torch.save(mt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = MeanTeacher.from_state(_net(), state)
    assert resumed.step_offset == 8 and resumed.total_steps == 50 and resumed.config.ema_decay == 0.9
    assert _same(_params(resumed.teacher), _params(mt.teacher))
    assert resumed.weight(0) == mt.weight(5)  # the ramp goes on where the last call stopped


def test_mean_teacher_batches_hide_unlabelled_labels():
    lab_images = [np.zeros((1, 3, 20, 20), np.float32)]
    labelled = PatchSampler(
        lab_images, [np.ones((3, 20, 20), np.uint8)], PATCH, num_classes=2, foreground_oversample=1.0
    )
    batches = mean_teacher_batches(
        labelled, [np.ones((1, 2, 18, 24), np.float32)], 4, augment=AugmentConfig(p_intensity=0.0, p_noise=0.0)
    )
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = batches(rng)
        n = batches.last_labelled
        assert x.shape == (4, 1, *PATCH) and y.shape == (4, *PATCH) and n == 2
        assert (x[:n] == 0).all() and (y[:n] == 1).all()
        assert (y[n:] == 255).all() and (x[n:] > 0).any()  # unlabelled: image from U, labels all ignored
    with pytest.raises(ValueError, match="unlabelled image"):
        mean_teacher_batches(labelled, [], 4)
    sampler = unlabelled_sampler([np.ones((1, 4, 8, 8), np.float32)], (2, 4, 4), ignore_index=9)
    _, label = sampler.sample(rng)
    assert label.shape == (2, 4, 4) and (label == 9).all()


def _mt_setup(u_labels: str = "truth", u_fg: float = 0.0) -> tuple[MixedBatches, UNet, MeanTeacher]:
    images, labels = _volumes(3, 4)
    if u_labels == "garbage":
        labels = labels[:2] + [
            np.random.default_rng(9).integers(0, 2, lab.shape).astype(np.uint8) for lab in labels[2:]
        ]
    lab = PatchSampler(images[:2], labels[:2], PATCH, num_classes=2)
    unl = PatchSampler(images[2:], labels[2:], PATCH, num_classes=2, foreground_oversample=u_fg)
    net = _net()
    return MixedBatches(lab, unl, 4), net, MeanTeacher(net, MeanTeacherConfig(rampup=0.5), total_steps=4)


def test_unlabelled_labels_never_reach_the_loss():
    results = []
    for which in ("truth", "garbage"):
        batches, net, mt = _mt_setup(which)
        summary = train_steps(net, batches, steps=3, lr=1e-2, rng=np.random.default_rng(5), consistency=mt)
        results.append((summary, _params(net), _params(mt.teacher)))
    (s1, net1, t1), (s2, net2, t2) = results
    assert _same(net1, net2) and _same(t1, t2)
    assert s1["loss"] == s2["loss"] and math.isnan(s1["pseudo_loss"])


def test_train_steps_with_mean_teacher_is_deterministic_and_moves_the_teacher():
    runs = []
    for _ in range(2):
        batches, net, mt = _mt_setup()
        before = _params(mt.teacher)
        summary = train_steps(net, batches, steps=4, lr=1e-2, rng=np.random.default_rng(6), consistency=mt)
        runs.append((summary, _params(net), _params(mt.teacher)))
    (s1, net1, t1), (s2, net2, t2) = runs
    assert s1 == s2 and _same(net1, net2) and _same(t1, t2)
    assert not _same(t1, before) and not _same(t1, net1)  # an average: neither the start nor the student
    assert s1["consistency_loss"] > 0 and s1["consistency_weight"] == pytest.approx(mt.weight(3))
    assert mt.state_dict()["step"] == 4


def test_consistency_draws_one_seed_and_nothing_else_from_rng():
    """Without consistency the batches are those of the rng alone (as before); with it, one seed comes first."""
    for with_mt in (False, True):
        batches, net, mt = _mt_setup()
        seen = []

        def record(rng, batches=batches, seen=seen):
            seen.append(batches(rng))
            return seen[-1]

        record.last_labelled = 2
        train_steps(net, record, steps=2, lr=1e-2, rng=np.random.default_rng(7), consistency=mt if with_mt else None)
        twin = np.random.default_rng(7)
        if with_mt:
            twin.integers(2**63)
        for x, y in seen:
            x2, y2 = batches(twin)
            assert np.array_equal(x, x2) and np.array_equal(y, y2)


def test_zero_weight_trains_like_the_labelled_part_alone():
    """Consistency 0: the student follows supervised training on the labelled samples only."""
    batches, net, mt = _mt_setup()
    mt = MeanTeacher(net, MeanTeacherConfig(consistency=0.0), total_steps=3)
    rng = np.random.default_rng(8)
    drawn = [(*batches(rng), batches.last_labelled) for _ in range(3)]
    train_loader(net, drawn, steps=3, lr=1e-2, consistency=mt)
    alone = _net()
    train_loader(alone, [(x[:n], y[:n], n) for x, y, n in drawn], steps=3, lr=1e-2)
    for a, b in zip(_params(net), _params(alone)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_train_loader_resumes_mean_teacher_exactly():
    batches, net, mt = _mt_setup()
    rng = np.random.default_rng(9)
    drawn = [(*batches(rng), batches.last_labelled) for _ in range(4)]
    saved = {}

    def keep(step, run):
        if step == 2:
            saved.update(state=copy.deepcopy(run.state(step)), model=_params(run.model))  # as if saved to disk

    full = train_loader(net, drawn, steps=4, lr=1e-2, consistency=mt, noise_seed=3, on_step=keep)
    again = _net()
    again.load_state_dict(dict(zip(again.state_dict(), saved["model"])))
    mt2 = MeanTeacher(again, MeanTeacherConfig(rampup=0.5), total_steps=4)
    resumed = train_loader(again, drawn[2:], steps=4, lr=1e-2, consistency=mt2, noise_seed=3, resume=saved["state"])
    assert _same(_params(again), _params(net)) and _same(_params(mt2.teacher), _params(mt.teacher))
    assert resumed == full
    with pytest.raises(ValueError, match="consistency term state"):
        state = {k: v for k, v in saved["state"].items() if not k.startswith("consistency")}
        train_loader(_net(), drawn[2:], steps=4, lr=1e-2, consistency=mt2, resume=state)
