"""ATSO on disk storage: the preprocessing cache, the memory-mapped sampler and its DataLoader,
the per-round export + bulk relabel, and resuming after SIGKILL at three points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from atso_fast.datasets.synthetic import make_archive, phantom_num_classes
from atso_fast.io import read_volume
from atso_fast.train import ATSO, ArchiveATSO, CacheStore
from atso_fast.train.cache import build_cache, save_npy
from atso_fast.train.data import PatchCase, PatchSampler, locate_foreground, read_listing
from atso_fast.train.loader import BatchDataset, make_loader
from atso_fast.train.trainer import MixedBatches

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parents[1]


def _cache(root: Path, data: Path, **kw):
    listing, base = read_listing(data)
    args = {
        "window": [8, 16, 16],
        "in_channels": 1,
        "num_classes": phantom_num_classes(),
        "normalization": "auto",
        "spacing": [2.5, 3.0, 3.0],
        **kw,
    }
    return build_cache(listing, base, root, progress=False, **args)


def test_cache_resamples_reuses_and_invalidates(tmp_path):
    archive = make_archive(tmp_path / "data", 4, num_labelled=2, num_val=1, shape=(8, 16, 24), seed=1)
    cache = _cache(tmp_path / "cache", tmp_path / "data")
    assert cache.built == 5 and cache.normalization["scheme"] == "ct" and cache.spacing == [2.5, 3.0, 3.0]
    case = cache.cases["labelled"][0]
    image, label = np.load(case.image, mmap_mode="r"), np.load(case.label, mmap_mode="r")
    assert image.shape == (1, 8, 8, 12) and image.dtype == np.float32 and label.shape == (8, 8, 12)
    # nearest resampling keeps labels real classes; the fg index is the sampler's own
    raw = read_volume(archive["labelled"][0]["label"])[0]
    assert set(np.unique(label)) <= set(np.unique(raw))
    fg, counts = locate_foreground(np.asarray(label), phantom_num_classes())
    assert np.array_equal(np.load(case.fg), fg) and case.fg_counts == counts
    assert cache.cases["unlabelled"][0].label is None and len(cache.cases["val"]) == 1
    # a warm cache reads nothing; a changed input rebuilds that case; a changed spec all
    assert _cache(tmp_path / "cache", tmp_path / "data").built == 0
    path = Path(archive["unlabelled"][0]["image"])
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert _cache(tmp_path / "cache", tmp_path / "data").built == 1
    assert _cache(tmp_path / "cache", tmp_path / "data", normalization="zscore").built == 5


def test_cache_names_a_bad_labelled_case(tmp_path):
    make_archive(tmp_path / "data", 3, num_labelled=1, num_val=0, shape=(8, 16, 16), fmt="npy", seed=2)
    bad = next((tmp_path / "data" / "labelsTr").iterdir())
    np.save(bad, np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=f"{bad.name}: label shape"):
        _cache(tmp_path / "cache", tmp_path / "data", spacing=None)


def _phantom_files(tmp_path: Path, n: int = 3):
    rng = np.random.default_rng(0)
    cases, images, labels = [], [], []
    for i in range(n):
        image = rng.normal(size=(1, 6, 20, 18)).astype(np.float32)
        label = (rng.random((6, 20, 18)) < 0.05).astype(np.uint8) * rng.integers(1, 3, size=(6, 20, 18))
        label = label.astype(np.uint8)
        fg, counts = locate_foreground(label, 3)
        paths = [save_npy(tmp_path / f"{kind}{i}.npy", a) for kind, a in (("i", image), ("l", label), ("f", fg))]
        cases.append(PatchCase(paths[0], paths[1], label.shape, paths[2], counts))
        images.append(image)
        labels.append(label)
    return cases, images, labels


def test_disk_sampler_draws_what_the_memory_sampler_draws(tmp_path):
    """One sampler: over .npy files with the cache's foreground index, and over arrays in memory."""
    cases, images, labels = _phantom_files(tmp_path)
    disk = PatchSampler.from_cases(cases, (4, 16, 16), foreground_oversample=0.7)
    memory = PatchSampler(images, labels, (4, 16, 16), num_classes=3, foreground_oversample=0.7)
    arrays = PatchSampler.from_cases(
        [PatchCase(i, lab, lab.shape, *locate_foreground(lab, 3)) for i, lab in zip(images, labels)],
        (4, 16, 16),
        foreground_oversample=0.7,
    )
    rngs = [np.random.default_rng(5) for _ in range(3)]
    fg = 0
    for _ in range(20):
        (xa, ya), (xb, yb), (xc, yc) = disk.sample(rngs[0]), memory.sample(rngs[1]), arrays.sample(rngs[2])
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb) and np.array_equal(xa, xc) and np.array_equal(ya, yc)
        fg += int((ya > 0).any())
    assert fg > 5  # foreground-centred patches were drawn, not only uniform ones
    with pytest.raises(ValueError, match="at least one case"):
        PatchSampler.from_cases([], (4, 16, 16))


def test_disk_sampler_ignores_low_confidence_voxels(tmp_path):
    cases, _, _ = _phantom_files(tmp_path, n=1)
    conf = np.full(cases[0].shape, 200, np.uint8)
    conf[:, :10] = 50
    cases[0].confidence = save_npy(tmp_path / "c0.npy", conf)
    rng = np.random.default_rng(0)
    sampler = PatchSampler.from_cases(cases, (6, 20, 18), foreground_oversample=0.0, threshold=0.5)  # the whole case
    _, label = sampler.sample(rng)
    assert (label[:, :10] == 255).all() and (label[:, 10:] != 255).all()


def test_loader_batches_do_not_depend_on_workers(tmp_path):
    cases, _, _ = _phantom_files(tmp_path)
    patch = (4, 16, 16)
    batches = MixedBatches(PatchSampler.from_cases(cases, patch), PatchSampler.from_cases(cases[1:], patch), 3)
    data = BatchDataset(batches, (0, 1, 1), 5)
    seen = [[(x.numpy(), y.numpy(), n) for x, y, n in make_loader(data, workers=w, start=1)] for w in (0, 2)]
    assert len(seen[0]) == len(seen[1]) == 4
    for (x0, y0, n0), (x1, y1, n1) in zip(*seen):
        assert np.array_equal(x0, x1) and np.array_equal(y0, y1) and n0 == n1


# ------------------------------------------------------------------ the loop, end to end
def _config(tmp_path: Path, out: str, **extra) -> dict:
    data = tmp_path / "data"
    if not data.is_dir():
        make_archive(data, 8, num_labelled=2, num_val=1, shape=(8, 16, 16), fmt="npy", seed=3, unlabelled_truth=True)
    return {
        "data": str(data),
        "num_classes": phantom_num_classes(),
        "patch_size": [8, 16, 16],
        "model": {"base_channels": 4, "depth": 2},
        "warmup_steps": 3,
        "rounds": 1,
        "steps_per_round": 3,
        "batch_size": 2,
        "cache_dir": str(tmp_path / "cache"),
        "checkpoint_every": 1,
        "out_dir": str(tmp_path / out),
        "consolidate": False,
        **extra,
    }  # consolidation: tests of its own


def _stable(path: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("seconds", "timing")} for row in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted in-process run (no loader workers, one torch thread as the killed runs:
    this module-scoped fixture runs before the function-scoped ``torch_one_thread``), with a
    callback."""
    from atso_fast.runtimes.torch_rt import torch_threads

    tmp_path = tmp_path_factory.mktemp("archive")
    seen = []
    with torch_threads(1):
        atso = ATSO(_config(tmp_path, "ref"), callbacks=[lambda run, m: seen.append(m)])
        assert isinstance(atso.store, CacheStore) and ArchiveATSO is ATSO
        atso.run()
    return tmp_path, seen


def test_rounds_export_relabel_and_call_back(reference):
    tmp_path, seen = reference
    out = tmp_path / "ref"
    assert [m["round"] for m in seen] == [0, 1] and seen[1]["trained_on"] == ["L", "U1"]
    for m in seen:
        package, pseudo = Path(m["package_path"]), Path(m["pseudo_path"])
        meta = json.loads((package / "model.json").read_text())
        assert meta["normalization"]["scheme"] == "ct" and "preprocessing" in meta
        rows = [json.loads(r) for r in (pseudo / "manifest.jsonl").read_text().splitlines()]
        assert rows and all(r["status"] == "ok" for r in rows)
        assert all((pseudo / f"{r['case_id']}_confidence.npy").is_file() for r in rows)
        assert m["relabel"]["runtime"] and m["timing"]["relabel_busy_fraction"] > 0
    assert seen[1]["relabelled"] == ["U2"] and seen[1]["monitor"]["U2"]["changed_fraction"] is not None
    assert seen[1]["monitor"]["U2"]["pseudo_dice"] is not None and seen[1]["val_mean_dice"] is not None
    # the held-out side of the premise is measured on disk too (the trained side needs another pass: memory only)
    held = seen[1]["monitor"]["U2"]
    assert seen[1]["premise"]["held_gain"] == pytest.approx(held["pseudo_dice"] - held["pseudo_dice_before"])
    assert seen[1]["premise"]["trained_gain"] is None and seen[1]["student"]["start_agreement"] is None
    # round 1's grid package: the same network, no preprocessing but its window grid
    source, grid = out / "round_1" / "package", out / "round_1" / "grid_package"
    meta, derived = (json.loads((f / "model.json").read_text()) for f in (source, grid))
    assert derived["normalization"] == {"scheme": "none"} and derived["spacing"] is None
    assert derived["preprocessing"]["grid"] == meta["preprocessing"]["grid"] and derived["torch_file"] is None
    assert (grid / derived["onnx_file"]).read_bytes() == (source / meta["onnx_file"]).read_bytes()
    assert {
        k: v for k, v in derived.items() if k not in ("normalization", "spacing", "preprocessing", "torch_file")
    } == {
        k: v
        for k, v in meta.items()
        if k not in ("normalization", "spacing", "preprocessing", "torch_file", "torch_sha256")
    }
    # the checkpoint holds the model and round state, not data
    import torch

    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["phase"] == "done" and state["round"] == 1 and state["train_state"] is None
    assert not any(isinstance(v, torch.Tensor) and v.dim() >= 3 for v in state.values())


def test_disk_run_reinit_consolidates_and_predicts(tmp_path):
    """The published setting on disk storage: reinit students, a consolidated final model that is
    exported like a round's, and predict() on the finished run (the memory path's API)."""
    import numpy as np

    atso = ATSO(_config(tmp_path, "pub", init="reinit", consolidate=True, checkpoint_every=0))
    history = atso.run()
    assert isinstance(atso.store, CacheStore) and atso.finished
    assert [h["stage"] for h in history] == ["warm-up", "round", "consolidate"]
    assert [h["student_from"] for h in history[1:]] == ["theta0", "theta0"]
    assert history[-1]["model"] == "Mc" and history[-1]["trained_on"] == ["L", "U1", "U2"]
    assert history[-1]["pseudo_dir"] is None and (tmp_path / "pub" / "round_2" / "package" / "model.json").is_file()
    assert all(h["train"]["steps"] == 3 for h in history) and history[-1]["val_cases"]["cases"] == 1
    case = atso.store.cache.cases["val"][0]
    labels, confidence = atso.predict([np.asarray(np.load(case.image, mmap_mode="r"))])[0]
    assert labels.shape == tuple(case.shape) and confidence.dtype == np.uint8
    # evaluate/validate with the live model and with the exported grid package agree with the record
    live, exported = atso.validate(), atso.validate(tmp_path / "pub" / "round_2" / "grid_package")
    assert exported["val_mean_dice"] == history[-1]["val_mean_dice"]
    assert live["val_dice"] == pytest.approx(exported["val_dice"], abs=0.02, nan_ok=True)
    assert atso.evaluate(atso.store.cache.cases["val"])["cases"]["cases"] == 1
    again = ATSO(_config(tmp_path, "pub", init="reinit", consolidate=True, checkpoint_every=0))
    assert again.resume() and again.finished and again.run() == history  # nothing left to do


def _train(config: Path, *args: str, kill: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [str(Path(__file__).with_name("kill_at.py")), kill] if kill else ["-m", "atso_fast"]
    return subprocess.run(
        [
            sys.executable,
            *command,
            *([] if kill else ["train"]),
            str(config),
            "--no-export",
            "--threads",
            "1",
            "--log-level",
            "WARNING",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_kill_9_at_three_points_then_resume_equals_an_uninterrupted_run(reference):
    """One run killed with SIGKILL during the warm-up's relabel, then (resumed) during round 1's
    training, then (resumed again) right after round 1's export; the last resume finishes it.
    Its metrics equal the uninterrupted in-process run's (which used no loader workers)."""
    import torch

    tmp_path, _ = reference
    config = tmp_path / "killed.json"
    config.write_text(json.dumps(_config(tmp_path, "killed", loader_workers=2)))
    out = tmp_path / "killed"
    for i, kill in enumerate(["relabel:0:2", "train:1:2", "export:1"]):
        killed = _train(config, *(["--resume"] if i else []), kill=kill)
        assert killed.returncode == -9, killed.stderr[-2000:]
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        phase, k = kill.split(":")[:2]
        assert (state["round"], state["phase"]) == (int(k) - 1, phase)
        if phase == "relabel":  # one case finished before the kill: the resume skips it
            assert len((out / "round_0" / "pseudo" / "manifest.jsonl").read_text().splitlines()) == 1
        if phase == "train":  # checkpoint_every=1: optimiser state saved after step 2, then killed
            assert state["train_state"]["step"] == 2
    resumed = _train(config, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _stable(out / "metrics.jsonl") == _stable(tmp_path / "ref" / "metrics.jsonl")
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["timing"]["relabel_skipped"] == 1


def test_storage_choice_and_refusals(tmp_path):
    from atso_fast.train.atso import resolve_storage

    cfg = _config(tmp_path, "x")
    assert resolve_storage(cfg) == "disk" and resolve_storage({**cfg, "storage": "memory"}) == "memory"
    assert resolve_storage({**cfg, "targets": "soft"}) == "memory"
    assert resolve_storage(cfg, data=object()) == "memory"  # arrays passed in: the memory path
    with pytest.raises(ValueError, match="hard targets"):
        ATSO({**cfg, "storage": "disk", "targets": "soft"})
    with pytest.raises(ValueError, match="memory storage only"):
        ATSO({**cfg, "method": "mean-teacher"})
    with pytest.raises(ValueError, match="relabeler= "):
        ATSO(cfg, relabeler=lambda model, volumes: [])


def test_cache_leaves_out_a_bad_unlabelled_case(tmp_path):
    make_archive(tmp_path / "data", 4, num_labelled=1, num_val=0, shape=(8, 16, 16), fmt="npy", seed=2)
    bad = sorted((tmp_path / "data" / "imagesUn").iterdir())[0]
    bad.write_bytes(b"not an npy file")
    cache = _cache(tmp_path / "cache", tmp_path / "data", spacing=None)
    assert len(cache.cases["unlabelled"]) == 2 and [f[0] for f in cache.failed] == [str(bad)]


def test_train_engine_option(tmp_path, monkeypatch, capsys):
    import atso_fast.cli.train as train_cli
    from atso_fast.cli import main

    calls = []
    monkeypatch.setattr(train_cli, "relabel_archive_ray", lambda *a, **kw: calls.append((a, kw)) or {"done": 1})
    assert train_cli.ray_archive_engine(
        Path("pkg"), [Path("a.npy")], Path("out"), options={"workers": 2}, resume=True
    ) == {"done": 1}
    assert calls == [(("pkg", ["a.npy"], Path("out")), {"resume": True, "workers": 2})]
    config = tmp_path / "memory.json"
    config.write_text(json.dumps({**_config(tmp_path, "m"), "storage": "memory"}))
    assert main(["train", str(config), "--engine", "ray", "--log-level", "WARNING"]) == 2
    assert "relabels on disk storage" in capsys.readouterr().err


def test_cache_reads_a_list_file_with_nrrd(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    archive = make_archive(tmp_path / "data", 2, num_labelled=1, num_val=0, shape=(8, 16, 24), seed=4)
    image = sitk.GetImageFromArray(read_volume(archive["unlabelled"][0]["image"])[0])
    image.SetSpacing((1.5, 1.5, 2.5))  # x, y, z
    sitk.WriteImage(image, str(tmp_path / "scan.nrrd"))
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps({"labelled": archive["labelled"], "unlabelled": ["scan.nrrd"]}))
    cache = _cache(tmp_path / "cache", listing)
    (case,) = cache.cases["unlabelled"]
    assert case.case_id == "scan" and case.shape == (8, 8, 12)


def test_disk_run_measures_the_engine_pass_monitors_when_asked(tmp_path):
    """monitor_on_disk: the student exported before it trains and each round's package run over
    the part trained on once more; the start agreement and the premise's trained side are then
    finite (the truth of U is known here) and the scratch folders gone; without it both are NaN."""
    history = ATSO(_config(tmp_path, "prem", monitor_on_disk=True, checkpoint_every=0)).run()
    rounds = [h for h in history if h["stage"] == "round"]
    assert rounds and all("premise" in h for h in rounds)
    for h in rounds:
        side = h["premise"]
        assert all(0.0 <= side[key] <= 1.0 for key in ("trained_label_dice", "trained_model_dice", "trained_agreement"))
        assert side["trained_gain"] == pytest.approx(side["trained_model_dice"] - side["trained_label_dice"])
        assert 0.0 <= h["student"]["start_agreement"] <= 1.0
        for scratch in ("premise", "student"):
            assert not (tmp_path / "prem" / f"round_{h['round']}" / scratch).exists()
    plain = ATSO(_config(tmp_path, "plain", checkpoint_every=0)).run()
    plain_rounds = [h for h in plain if h["stage"] == "round"]
    assert all(h["premise"]["trained_gain"] is None for h in plain_rounds)  # NaN, written as null
    assert all(h["student"]["start_agreement"] is None for h in plain_rounds)
