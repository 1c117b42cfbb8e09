"""ATSO rounds: split, schedule (who labels what), checkpoint/resume, baselines, monitors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from atso_fast.datasets.synthetic import make_phantoms, phantom_num_classes
from atso_fast.train.atso import (
    ATSO,
    CHECKPOINT_NAME,
    METRICS_NAME,
    ATSOConfig,
    build_model,
    default_relabel_fn,
    plan_round,
    run_methods,
    split_balanced,
)
from atso_fast.train.data import data_from_arrays

SHAPE = (8, 16, 16)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def phantom_data():
    ph = make_phantoms(9, SHAPE, seed=0, target_radius=(0.2, 0.3))
    return data_from_arrays(ph[:2], [p for p in ph[2:7]], ph[7:], normalization="ct")


def tiny_config(**kw) -> ATSOConfig:
    base = dict(
        num_classes=phantom_num_classes(),
        patch_size=SHAPE,
        model={"base_channels": 4, "depth": 2},
        rounds=2,
        warmup_steps=4,
        steps_per_round=3,
        lr=3e-3,
        round_lr=1e-3,
        monitor_patches=2,
        consolidate=False,
    )  # the consolidation step has tests of its own
    return ATSOConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- split
def test_split_is_deterministic_and_voxel_balanced():
    sizes = [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 5]
    a = split_balanced(sizes, seed=7)
    assert a == split_balanced(sizes, seed=7)
    assert sorted(a[0] + a[1]) == list(range(len(sizes))) and a[0] and a[1]
    loads = [sum(sizes[i] for i in half) for half in a]
    assert abs(loads[0] - loads[1]) <= max(sizes)
    assert abs(loads[0] - loads[1]) <= 5  # greedy largest-first does much better here
    equal = split_balanced([10] * 8, seed=1)
    assert len(equal[0]) == len(equal[1]) == 4
    assert equal != split_balanced([10] * 8, seed=2)  # the seed picks which cases go where


def test_split_validation():
    with pytest.raises(ValueError, match=">= 2"):
        split_balanced([5], seed=0)


def test_plan_round_table():
    assert [plan_round("atso", k) for k in (1, 2, 3)] == [(("U1",), ("U2",)), (("U2",), ("U1",)), (("U1",), ("U2",))]
    assert plan_round("self-training", 2) == (("U",), ("U",))
    assert plan_round("supervised", 1) == ((), ())
    with pytest.raises(ValueError, match="k >= 1"):
        plan_round("atso", 0)


# ----------------------------------------------------------------------------- schedule
class SpyNet(nn.Module):
    """Records the (constant) intensity of every training sample, i.e. which volume it came from."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = nn.Conv3d(1, num_classes, 1)
        self.seen: set[int] = set()

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            self.seen.update(int(round(float(v))) for v in x[:, 0, 0, 0, 0])
        return self.conv(x)


def _spy_setup(method: str, **kw):
    """Unlabelled volume i is constant 100 + i (truth: class i % 2); labelled volumes constant 0/1."""
    labelled = [(np.full(SHAPE, v, np.float32), np.full(SHAPE, v, np.uint8)) for v in (0, 1)]
    unlabelled = [(np.full(SHAPE, 100 + i, np.float32), np.full(SHAPE, i % 2, np.uint8)) for i in range(6)]
    data = data_from_arrays(labelled, unlabelled, normalization="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = SpyNet(2)
    log: list[dict] = []
    weights = {}

    def fingerprint(model):
        return hash(tuple(float(p.detach().sum()) for p in model.parameters()))

    def relabel(model, volumes):
        log.append({"volumes": sorted(int(v.flat[0]) - 100 for v in volumes), "model": fingerprint(model)})
        return default_relabel_fn(cfg)(model, volumes)

    cfg = tiny_config(
        **{
            "num_classes": 2,
            "method": method,
            "rounds": 3,
            "steps_per_round": 30,
            "augment": False,
            "normalization": "none",
            "foreground_oversample": 0.0,
            "monitor_patches": 0,
            **kw,
        }
    )
    atso = ATSO(cfg, model=net, relabeler=relabel, data=data)
    batch_sizes: list[int] = []
    forward = net.forward

    def spy_forward(x):
        if net.training and torch.is_grad_enabled():
            batch_sizes.append(x.shape[0])
        return forward(x)

    net.forward = spy_forward

    def on_round(run, metrics):
        weights[metrics["round"]] = fingerprint(run.model)
        metrics["seen"] = sorted(v - 100 for v in net.seen if v >= 100)
        metrics["batch_sizes"] = sorted(set(batch_sizes))
        batch_sizes.clear()
        net.seen.clear()

    atso.add_callback(on_round)
    return atso, log, weights


def test_atso_schedule_never_relabels_what_it_just_trained_on():
    atso, log, weights = _spy_setup("atso")
    history = atso.run()
    u1, u2 = atso.subsets["U1"], atso.subsets["U2"]
    # warm-up: M0 trains on L only, then labels U1 and U2
    assert history[0]["seen"] == [] and [e["volumes"] for e in log[:2]] == [u1, u2]
    assert log[0]["model"] == log[1]["model"] == weights[0]
    for k, (trained, relabelled) in zip((1, 2, 3), ((u1, u2), (u2, u1), (u1, u2))):
        probe, after, entry = log[3 * k - 1], log[3 * k], log[3 * k + 1]
        assert history[k]["seen"] == trained  # independent record: intensities the network saw
        # before training, the student predicts its training part (the agreement monitor) ...
        assert probe["volumes"] == trained and probe["model"] == weights[k - 1]
        # ... after it, predicts it again for the premise monitor (the truth is known here) ...
        assert after["volumes"] == trained and after["model"] == weights[k]
        assert history[k]["premise"]["trained_agreement"] is not None
        # ... and relabels the other part
        assert entry["volumes"] == relabelled and not set(entry["volumes"]) & set(history[k]["seen"])
        assert entry["model"] == weights[k]  # relabelled by the model fine-tuned this round (M_k)
        assert history[k]["relabelled_by"] == f"M{k}"
    # the labels each round trains on come from the previous round's model
    assert [h["train_labels_from"] for h in history[1:]] == [{"U1": ["M0"]}, {"U2": ["M1"]}, {"U1": ["M2"]}]


def test_self_training_relabels_exactly_what_it_trained_on():
    atso, log, weights = _spy_setup("self-training")
    history = atso.run()
    for k in (1, 2, 3):
        probe, entry = log[2 * k - 1], log[2 * k]  # the premise prediction is reused as the relabelling
        assert history[k]["seen"] == probe["volumes"] == entry["volumes"] == list(range(6))
        assert probe["model"] == weights[k - 1] and entry["model"] == weights[k]  # its own labels


def test_supervised_never_sees_unlabelled_data_and_matches_labelled_exposure():
    atso, log, _ = _spy_setup("supervised")
    history = atso.run()
    assert log == [] and all(h["seen"] == [] for h in history)
    # batch 2, half labelled: the warm-up uses whole batches, the rounds only the labelled half
    assert history[0]["batch_sizes"] == [2] and all(h["batch_sizes"] == [1] for h in history[1:])
    full, _, _ = _spy_setup("supervised", supervised_batch="full")
    assert all(h["batch_sizes"] == [2] for h in full.run())


def test_continue_atso_trains_on_its_own_labels_and_restarting_breaks_that(phantom_data):
    """The lazy-learning monitor: a student that made its own targets agrees with them exactly."""
    relabel = default_relabel_fn(tiny_config())
    runs = run_methods(
        tiny_config(rounds=2, warmup_steps=20, steps_per_round=10),
        {"continue": {"method": "atso"}, "restart": {"method": "atso", "init": "m0"}},
        data=phantom_data,
        relabeler=relabel,
    )
    lazy, fresh = runs["continue"].history[2], runs["restart"].history[2]
    assert lazy["student_from"] == "M1" and lazy["train_labels_from"] == {"U2": ["M1"]}
    assert lazy["student"]["start_agreement"] == 1.0  # M1 made the labels of U2 it now trains on
    assert fresh["student_from"] == "M0" and fresh["student"]["start_agreement"] < 1.0
    for h in (lazy, fresh):
        assert h["student"]["pseudo_loss"] > 0 and 0.0 <= h["monitor"]["U1"]["changed_fg"] <= 1.0
        assert 0.0 <= h["monitor"]["U1"]["changed_fg_m0"] <= 1.0 and 0.0 <= h["pseudo_dice_all"] <= 1.0
    restart, log, weights = _spy_setup("atso", init="base")  # the old name of m0
    assert restart.config.init == "m0"
    history = restart.run()
    assert [h["student_from"] for h in history[1:]] == ["M0", "M0", "M0"]
    for k in (1, 2, 3):
        assert log[3 * k - 1]["model"] == weights[0]  # every student starts from M0's weights


def test_two_lineages_never_train_on_their_own_labels():
    atso, log, weights = _spy_setup("atso", init="lineage", rounds=4)
    history = atso.run()
    # round 1: line "U2" from M0; 2: line "U1" from M0; 3: line "U2" from M1; 4: line "U1" from M2
    assert [h["student_from"] for h in history[1:]] == ["M0", "M0", "M1", "M2"]
    assert [log[3 * k - 1]["model"] for k in (1, 2, 3, 4)] == [weights[0], weights[0], weights[1], weights[2]]
    ancestors = {0: set()}
    for k, h in enumerate(history[1:], start=1):
        parent = int(h["student_from"][1:])
        ancestors[k] = ancestors[parent] | {parent} if parent else set()
        made = {int(m[1:]) for names in h["train_labels_from"].values() for m in names}
        assert not made & (ancestors[k] - {0}), (k, made, ancestors[k])  # no label made by its own line
    with pytest.raises(ValueError, match="lineage"):
        tiny_config(method="self-training", init="lineage")


def test_more_subsets_rotate_the_held_out_part():
    assert plan_round("atso", 1, 4) == (("U1", "U3", "U4"), ("U2",))
    assert [plan_round("atso", k, 3)[1] for k in (1, 2, 3, 4)] == [("U2",), ("U3",), ("U1",), ("U2",)]
    atso, log, _ = _spy_setup("atso", num_subsets=3, init="base")
    history = atso.run()
    parts = atso.subsets
    assert sorted(i for v in parts.values() for i in v) == list(range(6)) and all(len(v) == 2 for v in parts.values())
    for k, held in zip((1, 2, 3), ("U2", "U3", "U1")):
        trained = sorted(i for n, v in parts.items() if n != held for i in v)
        assert history[k]["seen"] == trained and log[3 + 3 * (k - 1) + 2]["volumes"] == parts[held]
    with pytest.raises(ValueError, match="num_subsets"):
        tiny_config(num_subsets=1)


def test_oracle_trains_on_the_truth_and_never_relabels():
    atso, log, _ = _spy_setup("oracle")
    history = atso.run()
    assert all(h["seen"] == list(range(6)) for h in history[1:])
    assert all(h["relabelled"] == [] and h["train_labels_from"] == {"U": ["truth"]} for h in history[1:])
    assert len(log) == 1 + 3  # warm-up relabels U once (monitor); each round only probes its student
    ph = make_phantoms(3, SHAPE, seed=0)
    with pytest.raises(ValueError, match="true labels"):
        ATSO(tiny_config(method="oracle"), data=data_from_arrays(ph[:1], [p[0] for p in ph[1:]]))


# ----------------------------------------------------------------------------- resume
def _snapshot(atso: ATSO):
    drop = {"seconds", "relabel"}
    return (
        {k: v.clone() for k, v in atso.model.state_dict().items()},
        [p.copy() for p in atso.store.pseudo],
        [{k: v for k, v in h.items() if k not in drop} for h in atso.history],
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"init": "continue"},
        {"init": "m0"},
        {"init": "lineage", "rounds": 3},
        {"targets": "soft", "init": "m0"},
        {"init": "reinit", "consolidate": True},
    ],
)
def test_resume_after_round_one_equals_uninterrupted(tmp_path, phantom_data, kw):
    relabel = default_relabel_fn(tiny_config(), probabilities=kw.get("targets") == "soft")
    full = ATSO(tiny_config(**kw, out_dir=str(tmp_path / "full")), relabeler=relabel, data=phantom_data)
    full.run()
    part = ATSO(tiny_config(**kw, out_dir=str(tmp_path / "part")), relabeler=relabel, data=phantom_data)
    part.warmup()
    part.round()
    del part  # "crash" after round 1
    resumed = ATSO(tiny_config(**kw, out_dir=str(tmp_path / "part")), relabeler=relabel, data=phantom_data)
    assert resumed.resume() and resumed.round_index == 1
    resumed.run()
    a, b = _snapshot(full), _snapshot(resumed)
    assert a[0].keys() == b[0].keys()
    for key in a[0]:
        assert torch.equal(a[0][key], b[0][key]), key
    for x, y in zip(a[1], b[1]):
        np.testing.assert_array_equal(x, y)
    assert a[2] == b[2]
    lines = (tmp_path / "part" / METRICS_NAME).read_text().splitlines()
    stages = full.config.rounds + 1 + full.config.consolidate
    assert [json.loads(line)["round"] for line in lines] == list(range(stages))


def test_checkpoint_is_weights_only_and_guards_mismatches(tmp_path, phantom_data):
    relabel = default_relabel_fn(tiny_config())
    atso = ATSO(tiny_config(rounds=1, out_dir=str(tmp_path)), relabeler=relabel, data=phantom_data)
    atso.run()
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["round"] == 1 and state["pseudo"][0].dtype == torch.uint8
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    other = ATSO(tiny_config(method="self-training"), relabeler=relabel, data=phantom_data)
    with pytest.raises(ValueError, match="cannot resume"):
        other.load_state_dict(state)
    ph = make_phantoms(4, SHAPE, seed=1)
    fewer = ATSO(
        tiny_config(), relabeler=relabel, data=data_from_arrays(ph[:1], [p[0] for p in ph[1:3]], normalization="ct")
    )
    with pytest.raises(ValueError, match="unlabelled cases"):
        fewer.load_state_dict(state)
    with pytest.raises(RuntimeError, match="all 1 rounds"):
        atso.round()


# ----------------------------------------------------------------------------- end to end
def test_tiny_end_to_end_with_the_relabel_engine(tmp_path, phantom_data):
    """Two ATSO rounds on CPU through the default relabel path (Relabeler.from_module)."""
    atso = ATSO(tiny_config(out_dir=str(tmp_path)), data=phantom_data)
    history = atso.run()
    assert [h["round"] for h in history] == [0, 1, 2]
    for h in history:
        assert len(h["val_dice"]) == phantom_num_classes() and 0.0 <= h["val_mean_dice"] <= 1.0
        assert h["train"]["steps"] == (4 if h["round"] == 0 else 3)
    mon = history[1]["monitor"]
    assert set(mon) == {"U1", "U2"} and mon["U1"]["pre_loss"] > 0
    assert 0.0 <= mon["U2"]["changed_fraction"] <= 1.0 and 0.0 < mon["U2"]["mean_confidence"] <= 1.0
    assert "pseudo_dice" in mon["U2"]  # the phantoms' truth is known, so pseudo-label quality is measured


def test_relabelling_sees_a_region_as_training_saw_it_instance_norm():
    """One relabel path: the sliding window is the training patch, so an InstanceNorm network
    labels a region as it did when that region was a training patch. A whole-volume pass (the
    old experiments' shortcut) normalises over other statistics and labels it differently."""
    cfg = tiny_config(num_classes=3, relabel={"overlap": 0.0})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = build_model(cfg)
        for p in model.parameters():
            p.data.normal_(0, 0.5)
    model.eval()
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(1, SHAPE[0], SHAPE[1], 2 * SHAPE[2])).astype(np.float32)
    volume[..., SHAPE[2] :] = volume[..., SHAPE[2] :] * 3 + 2  # the two halves differ in statistics
    labels = default_relabel_fn(cfg)(model, [volume])[0][0]
    with torch.no_grad():
        whole = model(torch.from_numpy(volume[None]))[0]
        for half in (slice(0, SHAPE[2]), slice(SHAPE[2], None)):
            logits = model(torch.from_numpy(np.ascontiguousarray(volume[None, ..., half])))[0]
            np.testing.assert_array_equal(labels[..., half], logits.argmax(0).numpy())
            # the mismatch the engine's path avoids: other normalisation statistics, other logits
            assert float((whole[..., half] - logits).abs().max()) > 0.5


def test_threshold_ignores_low_confidence_voxels(phantom_data):
    relabel = default_relabel_fn(tiny_config())
    atso = ATSO(tiny_config(rounds=1, threshold=1.0), relabeler=relabel, data=phantom_data)
    history = atso.run()
    assert history[0]["monitor"]["U1"]["ignored_fraction"] > 0.5
    sampler = atso._pseudo_sampler(atso.subsets["U1"])
    assert all((lab == 255).mean() > 0.5 for lab in sampler.labels)


def test_run_methods_shares_the_warm_up(tmp_path, phantom_data):
    relabel = default_relabel_fn(tiny_config())
    runs = run_methods(
        tiny_config(rounds=1, out_dir=str(tmp_path)),
        ("supervised", "self-training", "atso"),
        data=phantom_data,
        relabeler=relabel,
    )
    assert list(runs) == ["supervised", "self-training", "atso"]
    warm = [r.history[0]["val_dice"] for r in runs.values()]
    # every run started from the one warm-up's weights (not three warm-ups that happen to agree)
    import torch

    shared = torch.load(tmp_path / "warmup" / CHECKPOINT_NAME, weights_only=True)["model"]
    for run in runs.values():
        assert shared.keys() == run.base_state.keys()
        assert all(torch.equal(run.base_state[k], shared[k]) for k in shared)
    probe = runs["supervised"]  # and the shared round-0 record is those weights' own score
    probe.model.load_state_dict(shared)
    np.testing.assert_allclose(probe.evaluate(phantom_data.val)["dice"], warm[0], rtol=1e-6)
    assert runs["self-training"].history[0]["warmup_from"] == "atso"
    assert runs["self-training"].history[1]["trained_on"] == ["L", "U"]
    assert runs["supervised"].history[1]["trained_on"] == ["L"]
    assert (tmp_path / "supervised" / CHECKPOINT_NAME).is_file()
    assert (tmp_path / "warmup" / CHECKPOINT_NAME).is_file()
    variants = run_methods(
        tiny_config(rounds=1), {"atso t=1": {"threshold": 1.0, "method": "atso"}}, data=phantom_data, relabeler=relabel
    )
    assert variants["atso t=1"].config.threshold == 1.0
    assert variants["atso t=1"].history[0]["val_dice"] == warm[0]
    with pytest.raises(ValueError, match="method must be one of"):
        run_methods(tiny_config(), {"x": {"method": "co-training"}}, data=phantom_data, relabeler=relabel)
    with pytest.raises(ValueError, match="unknown fields"):
        run_methods(tiny_config(), {"atso": {"epochs": 3}}, data=phantom_data, relabeler=relabel)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"method": "co-training"}, "method"),
        ({"threshold": [0.5, 0.9]}, "one per class"),
        ({"init": "random"}, "init"),
        ({"patch_size": (8, 16)}, "patch_size"),
        ({"threshold": 1.5}, "threshold"),
        ({"ignore_index": 3}, "ignore_index"),
        ({"optim": {"optimizer": "adam"}}, "optimizer"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kw)


def test_config_from_dict_and_data_errors(phantom_data):
    with pytest.raises(ValueError, match="unknown ATSOConfig keys"):
        ATSOConfig.from_dict({"rounds": 1, "epochs": 3})
    assert ATSOConfig.from_dict(tiny_config().to_dict()) == tiny_config()
    with pytest.raises(ValueError, match="needs data"):
        ATSO(tiny_config())
    ph = make_phantoms(2, SHAPE, seed=0)
    with pytest.raises(ValueError, match="at least 2 unlabelled"):
        ATSO(tiny_config(), data=data_from_arrays(ph[:1], [ph[1][0]]))
    with pytest.raises(ValueError, match="multiples of 4"):
        ATSO(tiny_config(model={"base_channels": 2, "depth": 3}, patch_size=(6, 16, 16)), data=phantom_data)


# ----------------------------------------------------------------------------- the published algorithm
def test_reinit_students_start_from_theta0_with_the_full_schedule():
    """The CVPR reading: no student inherits a teacher's weights; each trains the warm-up's schedule."""
    atso, log, weights = _spy_setup("atso", init="reinit", warmup_steps=7)
    theta0 = {k: v.clone() for k, v in atso.init_state.items()}
    history = atso.run()
    assert [h["student_from"] for h in history[1:]] == ["theta0"] * 3
    assert all(h["train"]["steps"] == 7 and h["train"]["lr"] == atso.config.lr for h in history)
    params = dict(atso.model.named_parameters())
    fingerprint0 = hash(tuple(float(v.sum()) for k, v in theta0.items() if k in params))
    assert all(log[3 * k - 1]["model"] == fingerprint0 for k in (1, 2, 3))  # the probe sees theta0's weights
    assert weights[1] != weights[0]  # trained away from theta0 again, not left at M0


def test_consolidation_trains_on_all_of_u_with_the_final_labels(phantom_data):
    atso = ATSO(tiny_config(consolidate=True), data=phantom_data)
    history = atso.run()
    assert atso.finished and [h["stage"] for h in history] == ["warm-up", "round", "round", "consolidate"]
    last = history[-1]
    assert last["model"] == "Mc" and last["student_from"] == "M2" and last["trained_on"] == ["L", "U1", "U2"]
    assert last["relabelled"] == [] and last["train_labels_from"] == {"U1": ["M2"], "U2": ["M1"]}
    assert last["train"]["steps"] == 3
    with pytest.raises(RuntimeError, match="all 2 rounds"):
        atso.round()
    with pytest.raises(RuntimeError, match="follows the last round"):
        atso.consolidate()
    m0_run = ATSO(tiny_config(consolidate=True, init="m0"), data=phantom_data)
    assert m0_run.run()[-1]["student_from"] == "M0"
    fresh = ATSO(tiny_config(consolidate=True), data=phantom_data)
    fresh.warmup()
    with pytest.raises(RuntimeError, match="follows the last round"):
        fresh.consolidate()


def test_evaluate_reports_per_case_dice_and_hd95(phantom_data):
    atso = ATSO(tiny_config(rounds=0), data=phantom_data)
    history = atso.run()
    cases = atso.evaluate(phantom_data.val)["cases"]
    assert cases["cases"] == len(phantom_data.val) and len(cases["dice_mean"]) == phantom_num_classes() - 1
    assert len(cases["hd95_per_case"]) == len(phantom_data.val)
    assert history[0]["val_cases"]["mean_dice"] == pytest.approx(cases["mean_dice"], nan_ok=True)
    assert "dice_per_case" not in history[0]["val_cases"]


def test_premise_monitor_compares_trained_and_held_out_parts(phantom_data):
    atso = ATSO(tiny_config(rounds=1), data=phantom_data)
    history = atso.run()
    p = history[1]["premise"]
    u1, u2 = history[1]["monitor"]["U1"], history[1]["monitor"]["U2"]
    assert history[1]["trained_on"] == ["L", "U1"] and history[1]["relabelled"] == ["U2"]
    assert p["held_gain"] == pytest.approx(u2["pseudo_dice"] - u2["pseudo_dice_before"])
    assert p["trained_gain"] == pytest.approx(p["trained_model_dice"] - p["trained_label_dice"])
    assert 0.0 <= p["trained_agreement"] <= 1.0 and "pseudo_dice" not in u1
    # the labels M1 trained on are M0's labels of U1: their Dice is the warm-up's monitor of U1
    assert p["trained_label_dice"] == pytest.approx(history[0]["monitor"]["U1"]["pseudo_dice"])


def test_class_wise_thresholds_keep_a_low_confidence_class(phantom_data):
    atso = ATSO(tiny_config(rounds=1, threshold=0.99), data=phantom_data)
    atso.warmup()
    i = atso.subsets["U1"][0]
    labels, conf = atso.store.pseudo[i], atso.store.confidence[i]
    per_class = [0.99] + [0.0] * (phantom_num_classes() - 1)  # strict on background, keep every organ
    strict = ATSO(tiny_config(rounds=1, threshold=per_class), data=phantom_data)
    strict.load_state_dict(atso.state_dict())
    one = atso._pseudo_sampler([i]).labels[0]
    each = strict._pseudo_sampler([i]).labels[0]
    fg = labels > 0
    assert (each[fg] == labels[fg]).all()  # no foreground voxel dropped
    assert ((one[fg] == 255) == (conf[fg] < 0.99 * 255)).all()
    assert (each[~fg] == 255).sum() == (conf[~fg] < 0.99 * 255).sum()


def test_pretrained_weights_become_theta0(tmp_path, phantom_data):
    source = build_model(tiny_config(seed=5))
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    atso = ATSO(tiny_config(pretrained=str(tmp_path / "weights.pt")), data=phantom_data)
    assert all(torch.equal(atso.init_state[k], v) for k, v in source.state_dict().items())
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: pretrained weights do not fit"):
        ATSO(tiny_config(pretrained=str(tmp_path / "other.pt")), data=phantom_data)


def test_labelled_ratio_zero_fine_tunes_on_pseudo_labels_alone():
    atso, _, _ = _spy_setup("atso", labelled_ratio=0.0, rounds=1)
    history = atso.run()
    assert history[1]["seen"] == atso.subsets["U1"] and history[1]["train"]["pseudo_loss"] is not None


def test_mean_teacher_arm_trains_on_u_images_with_an_ema_teacher(phantom_data):
    runs = run_methods(tiny_config(rounds=2, consolidate=True), ("mean-teacher", "supervised"), data=phantom_data)
    mt = runs["mean-teacher"]
    history = mt.history
    assert [h["trained_on"] for h in history[1:]] == [["L", "U"]] * 3 and all(not h["relabelled"] for h in history[1:])
    assert all(h["train"]["consistency_weight"] > 0 and h["train"]["consistency_loss"] >= 0 for h in history[1:])
    # the ramp continues across rounds: the weight grows from round to round
    weights = [h["train"]["consistency_weight"] for h in history[1:]]
    assert weights == sorted(weights) and weights[0] < weights[-1]
    assert mt.teacher_state is not None and mt.teacher_state["step"] == 3 * 3
    assert history[1]["train_labels_from"] == {"U": ["teacher"]}
    with pytest.raises(ValueError, match="mean-teacher"):
        tiny_config(method="mean-teacher", init="reinit")
