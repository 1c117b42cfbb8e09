"""Relabel engine: MONAI equivalence, known-answer predictors, streaming memory, options."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from atso_fast import Relabeler, export_model, load_package
from atso_fast.package import PackageError
from atso_fast.engine.relabeler import NonFiniteInputError


def random_net(in_ch=1, classes=3, dims=3, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    return torch.nn.Sequential(conv(in_ch, 8, 3, padding=1), torch.nn.Tanh(), conv(8, classes, 1)).eval()


class PlusOne(torch.nn.Module):
    """Known-answer predictor: one output channel equal to input + 1."""

    def forward(self, x):
        return x + 1


def monai_probs(net, volume, roi, overlap, classes):
    inferers = pytest.importorskip("monai.inferers")
    with torch.no_grad():
        logits = inferers.sliding_window_inference(torch.from_numpy(volume)[None], roi, 4, net, overlap=overlap,
                                                   mode="gaussian", sigma_scale=0.125)
    return torch.softmax(logits, 1)[0].numpy() if classes > 1 else torch.sigmoid(logits)[0].numpy()


@pytest.mark.parametrize("shape,roi,overlap,batch", [
    ((40, 50, 45), (16, 24, 20), 0.5, 3),
    ((40, 50, 45), (16, 24, 20), 0.5, 5),    # batches span two rows of windows
    ((40, 50, 45), (16, 24, 20), 0.5, 100),  # one batch holds every window
    ((10, 21, 33), (16, 16, 16), 0.25, 3),   # smaller than the window along z and y
    ((33, 17, 20), (8, 8, 8), 0.0, 4),
])
def test_matches_monai_sliding_window(rng, shape, roi, overlap, batch):
    net = random_net()
    volume = rng.standard_normal((1, *shape)).astype(np.float32)
    want = monai_probs(net, volume, roi, overlap, 3)
    rel = Relabeler.from_module(net, window=roi, num_classes=3, overlap=overlap, batch_size=batch,
                                save_probabilities=True)
    got = rel.relabel_volume(volume)
    np.testing.assert_allclose(got.probabilities, want, rtol=1e-5, atol=2e-6)
    agree = (got.labels == want.argmax(0)).mean()
    assert agree >= 0.9999, agree
    assert got.labels.shape == shape and got.labels.dtype == np.uint8


def test_known_answer_plus_one(rng):
    volume = rng.standard_normal((23, 31, 19)).astype(np.float32)
    rel = Relabeler.from_module(PlusOne(), window=(8, 16, 8), num_classes=1, kind="probabilities",
                                overlap=0.5, save_probabilities=True)
    got = rel.relabel_volume(volume)
    np.testing.assert_allclose(got.probabilities[0], volume + 1, rtol=1e-5, atol=1e-5)
    assert (got.labels == ((volume + 1) > 0.5)).mean() > 0.999


def test_accumulator_holds_one_window_depth(rng, monkeypatch):
    from atso_fast.engine import relabeler as relabel_mod

    shapes = []
    real_zeros = relabel_mod._Backend.zeros
    monkeypatch.setattr(relabel_mod._Backend, "zeros", lambda self, shape, dtype: shapes.append(shape) or real_zeros(self, shape, dtype))
    rel = Relabeler.from_module(random_net(classes=5), window=(8, 16, 16), num_classes=5, overlap=0.5)
    rel.relabel_volume(rng.standard_normal((64, 32, 32)).astype(np.float32))
    assert shapes[0] == (5, 8, 32, 32)  # C x pz x Y x X, not C x Z x Y x X


def test_float16_accumulator_agrees(rng):
    net = random_net(classes=4)
    volume = rng.standard_normal((30, 40, 40)).astype(np.float32)
    kw = dict(window=(16, 16, 16), num_classes=4, overlap=0.5)
    a = Relabeler.from_module(net, **kw).relabel_volume(volume)
    b = Relabeler.from_module(net, accumulate_dtype="float16", **kw).relabel_volume(volume)
    assert (a.labels == b.labels).mean() >= 0.999


def test_2d_network_runs_slice_by_slice(rng):
    net2d = random_net(dims=2)
    volume = rng.standard_normal((5, 40, 36)).astype(np.float32)

    class As3D(torch.nn.Module):  # the same 2D net applied per slice, for MONAI's 3D inferer
        def forward(self, x):
            b, m, z, y, xx = x.shape
            out = net2d(x.permute(0, 2, 1, 3, 4).reshape(b * z, m, y, xx))
            return out.reshape(b, z, -1, y, xx).permute(0, 2, 1, 3, 4)

    want = monai_probs(As3D(), volume[None], (1, 24, 24), 0.5, 3)
    rel = Relabeler.from_module(net2d, window=(24, 24), num_classes=3, overlap=0.5, save_probabilities=True)
    got = rel.relabel_volume(volume)
    np.testing.assert_allclose(got.probabilities, want, rtol=1e-5, atol=2e-6)
    image = rel.relabel_volume(volume[0])  # a 2D image is a depth-1 volume
    assert image.labels.shape == (1, 40, 36)


def test_threshold_ignore_and_stats(rng):
    net = random_net(classes=3)
    volume = rng.standard_normal((20, 24, 24)).astype(np.float32)
    rel = Relabeler.from_module(net, window=(8, 16, 16), num_classes=3, threshold=0.6, ignore_index=9,
                                save_probabilities=True)
    got = rel.relabel_volume(volume)
    low = got.probabilities.max(0) < 0.6
    assert ((got.labels == 9) == low).mean() > 0.999
    s = got.stats
    assert sum(s["label_counts"]) + s["ignored_voxels"] + s["invalid_voxels"] == volume.size
    assert s["ignored_fraction"] == pytest.approx(low.mean(), abs=1e-3)
    assert 0 < s["mean_confidence"] <= 1


def test_mirroring_of_an_equivariant_net_changes_nothing(rng):
    volume = rng.standard_normal((12, 20, 20)).astype(np.float32)
    kw = dict(window=(8, 8, 8), num_classes=1, kind="probabilities", save_probabilities=True)
    plain = Relabeler.from_module(PlusOne(), **kw).relabel_volume(volume)
    mirrored = Relabeler.from_module(PlusOne(), mirror=True, **kw).relabel_volume(volume)
    np.testing.assert_allclose(mirrored.probabilities, plain.probabilities, rtol=1e-6, atol=1e-6)
    assert mirrored.stats["windows"] == 8 * plain.stats["windows"]


def test_bad_volumes_raise_clear_errors(rng):
    rel = Relabeler.from_module(random_net(), window=(8, 8, 8), num_classes=3)
    with pytest.raises(ValueError, match=r"volume must be \(Z, Y, X\) or \(1, Z, Y, X\)"):
        rel.relabel_volume(np.zeros((2, 3, 8, 8, 8), np.float32))
    with pytest.raises(ValueError, match="volume is empty"):
        rel.relabel_volume(np.zeros((0, 8, 8), np.float32))
    with pytest.raises(ValueError, match="real numeric dtype"):
        rel.relabel_volume(np.array([["a"]]))
    vol = rng.standard_normal((10, 10, 10)).astype(np.float32)
    vol[1, 2, 3] = np.nan
    with pytest.raises(NonFiniteInputError, match="1 NaN/inf voxels"):
        rel.relabel_volume(vol)
    ok = Relabeler.from_module(random_net(), window=(8, 8, 8), num_classes=3, nonfinite="ignore").relabel_volume(vol)
    assert ok.labels[1, 2, 3] == 255 and ok.stats["nonfinite_input_voxels"] == 1
    assert sum(ok.stats["label_counts"]) + ok.stats["ignored_voxels"] + ok.stats["invalid_voxels"] == vol.size


def test_export_package_and_onnxruntime_match_torch(rng, tmp_path):
    net = random_net(classes=3)
    pkg_dir = export_model(net, tmp_path / "pkg", window=(8, 16, 16), num_classes=3,
                           normalization={"scheme": "zscore"}, class_names=["bg", "a", "b"])
    meta = json.loads((pkg_dir / "model.json").read_text())
    assert meta["window"] == [8, 16, 16] and meta["num_classes"] == 3 and meta["kind"] == "logits"
    assert meta["normalization"] == {"scheme": "zscore"} and meta["onnx_max_abs_diff"] < 1e-4
    volume = (rng.standard_normal((20, 30, 30)) * 50 + 100).astype(np.float32)
    onnx = Relabeler(pkg_dir, runtime="onnxruntime", save_probabilities=True).relabel_volume(volume)
    live = Relabeler.from_module(net, window=(8, 16, 16), num_classes=3, normalization={"scheme": "zscore"},
                                 save_probabilities=True).relabel_volume(volume)
    np.testing.assert_allclose(onnx.probabilities, live.probabilities, atol=1e-5)
    assert Relabeler(pkg_dir, runtime="auto").runtime_name == "auto"  # onnx + pt2 on cpu: measures
    many = export_model(random_net(classes=17), tmp_path / "many", window=(8, 16, 16), num_classes=17)
    assert Relabeler(many).runtime_name == "onnxruntime"  # > PROBE_MAX_CLASSES: the rule
    assert Relabeler(pkg_dir, precision="bfloat16").runtime_name == "torch"  # ORT runs float32 only
    (pkg_dir / "model.pt2").unlink()
    assert Relabeler(pkg_dir).runtime_name == "onnxruntime"  # onnx only: the rule


def test_torch_runtime_from_package(tmp_path, rng):
    net = random_net(classes=2)
    pkg_dir = export_model(net, tmp_path / "pkg", window=(8, 8, 8), num_classes=2)
    if load_package(pkg_dir).torch_file is None:
        pytest.skip("torch.export could not export this module here")
    vol = rng.standard_normal((10, 12, 12)).astype(np.float32)
    a = Relabeler(pkg_dir, runtime="torch").relabel_volume(vol)
    b = Relabeler(pkg_dir, runtime="onnxruntime").relabel_volume(vol)
    assert (a.labels == b.labels).mean() > 0.999


def test_broken_packages_name_file_and_problem(tmp_path):
    net = random_net(classes=2)
    pkg = export_model(net, tmp_path / "pkg", window=(8, 8, 8), num_classes=2)
    (pkg / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ValueError, match="model.onnx: ONNX Runtime cannot load the model"):
        Relabeler(pkg, runtime="onnxruntime")
    meta = json.loads((pkg / "model.json").read_text())
    meta["num_classes"] = 0
    (pkg / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="model.json: num_classes must be a positive integer"):
        load_package(pkg)
    with pytest.raises(PackageError, match="not found"):
        load_package(tmp_path / "missing")
    with pytest.raises(PackageError, match=r"expected \(1, 5, 8, 8, 8\)"):
        export_model(net, tmp_path / "bad", window=(8, 8, 8), num_classes=5)


def test_missing_runtimes_name_the_package():
    from atso_fast.runtimes import RuntimeUnavailable, TensorRTRuntime, tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is installed here")
    with pytest.raises(RuntimeUnavailable, match="pip install tensorrt"):
        TensorRTRuntime("model.onnx")


@pytest.mark.parametrize("dims", [2, 3])
def test_torch_runtime_channels_last_matches_and_leaves_the_module_alone(rng, dims):
    from atso_fast.runtimes import TorchRuntime

    net = random_net(classes=4, dims=dims).train()
    weight = net[0].weight
    shape = (3, 1, 16, 16) if dims == 2 else (3, 1, 8, 16, 16)
    batch = rng.standard_normal(shape).astype(np.float32)
    fast = TorchRuntime(net, channels_last=True)(batch)
    plain = TorchRuntime(net, channels_last=False)(batch)
    assert fast.flags.c_contiguous and fast.shape == (3, 4, *shape[2:])
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-6)
    assert net[0].weight is weight and weight.is_contiguous()  # caller's module not converted
    assert net.training


@pytest.mark.slow
def test_compiled_torch_runtime_pads_short_batches_instead_of_recompiling(rng):
    from atso_fast.runtimes import TorchRuntime

    import torch._dynamo

    net = random_net(classes=2)
    rt = TorchRuntime(net, compile=True, channels_last=False, probe_batch=3)  # no layout probe
    eager = TorchRuntime(net, compile=False, channels_last=False)
    full = rng.standard_normal((3, 1, 8, 8, 8)).astype(np.float32)
    torch._dynamo.reset()
    calls = []
    rt._fn = torch.compile(rt.module, dynamic=False, backend=lambda gm, ex: calls.append(1) or gm.forward)
    np.testing.assert_allclose(rt(full), eager(full), rtol=1e-4, atol=1e-5)
    short = full[:1]
    out = rt(short)  # padded to the compiled batch of 3, sliced back: no second compile
    assert out.shape == (1, 2, 8, 8, 8) and rt._batch == 3 and len(calls) == 1
    np.testing.assert_allclose(out, eager(short), rtol=1e-4, atol=1e-5)


def test_compile_needs_the_torch_runtime(tmp_path):
    pkg = export_model(random_net(classes=2), tmp_path / "pkg", window=(8, 8, 8), num_classes=2)
    with pytest.raises(ValueError, match="compile=True compiles the torch runtime"):
        Relabeler(pkg, runtime="onnxruntime", compile=True)
    assert Relabeler(pkg, compile=True).runtime_name == "torch"  # auto + compile -> torch


def test_torch_runtime_probes_the_layout_once_on_cpu(rng):
    from atso_fast.runtimes import TorchRuntime

    net = random_net(classes=3)
    rt = TorchRuntime(net)
    plain = TorchRuntime(net, channels_last=False)
    batches = [rng.standard_normal((2, 1, 8, 8, 8)).astype(np.float32) for _ in range(5)]
    for i, batch in enumerate(batches):
        assert rt.channels_last is None if i < 4 else isinstance(rt.channels_last, bool)
        out = rt(batch)  # 2 warm-ups, channels-last and contiguous timed, then the chosen layout
        assert out.flags.c_contiguous
        np.testing.assert_allclose(out, plain(batch), rtol=1e-5, atol=1e-6)
    assert set(rt.layout_probe) == {"contiguous_s", "channels_last_s"}
    assert net[0].weight.is_contiguous()


def test_layout_probe_waits_for_a_full_batch(rng):
    from atso_fast.runtimes import TorchRuntime

    rt = TorchRuntime(random_net(classes=2), probe_batch=3)
    for _ in range(4):
        rt(rng.standard_normal((1, 1, 8, 8, 8)).astype(np.float32))
    assert rt.channels_last is None and rt.layout_probe is None  # batches of 1 are no guide
    for _ in range(4):
        rt(rng.standard_normal((3, 1, 8, 8, 8)).astype(np.float32))
    assert isinstance(rt.channels_last, bool) and rt.layout_probe is not None


def test_onnxruntime_writes_into_one_reused_buffer(rng, tmp_path):
    pkg = export_model(random_net(classes=3), tmp_path / "pkg", window=(8, 16, 16), num_classes=3)
    rel = Relabeler(pkg, runtime="onnxruntime", batch_size=3, mirror=True, save_probabilities=True)
    assert rel.runtime.reuse_output  # the engine consumes each batch before the next call
    fresh = Relabeler(pkg, runtime="onnxruntime", batch_size=3, mirror=True, save_probabilities=True)
    fresh.runtime.reuse_output = False
    volume = rng.standard_normal((20, 30, 30)).astype(np.float32)
    a, b = rel.relabel_volume(volume), fresh.relabel_volume(volume)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    np.testing.assert_array_equal(a.labels, b.labels)
    full = rel.runtime(rng.standard_normal((3, 1, 8, 16, 16)).astype(np.float32))
    short = rel.runtime(rng.standard_normal((2, 1, 8, 16, 16)).astype(np.float32))
    assert short.shape == (2, 3, 8, 16, 16) and np.shares_memory(full, short)
    assert fresh.runtime._out_buf is None  # reuse off: a fresh array per call


def test_onnxruntime_relabeler_runs_kernels_on_one_thread(tmp_path):
    pkg = export_model(random_net(classes=2), tmp_path / "pkg", window=(8, 8, 8), num_classes=2)
    assert Relabeler(pkg, runtime="onnxruntime").kernel_threads == 1
    many = export_model(random_net(classes=12), tmp_path / "many", window=(8, 8, 8), num_classes=12)
    assert Relabeler(many, runtime="onnxruntime").kernel_threads is None  # kernels' own work wins
    assert Relabeler(pkg, runtime="onnxruntime", kernel_threads=2).kernel_threads == 2
    assert Relabeler.from_module(random_net(classes=2), window=(8, 8, 8), num_classes=2).kernel_threads is None


class _FakeRuntime:
    """Returns its tag after ``delay`` seconds; ``settle`` calls before it counts as settled."""

    device, precision = "cpu", "float32"

    def __init__(self, tag: float, delay: float, settle: int = 1):
        self.tag, self.delay, self.settle, self.calls = tag, delay, settle, 0
        self.channels_last = None if settle > 1 else False  # torch-like layout probe

    def __call__(self, batch):
        self.calls += 1
        if self.calls >= self.settle:
            self.channels_last = False
        time.sleep(self.delay)
        return np.full(batch.shape, self.tag, np.float32)


def test_auto_probe_times_each_candidate_then_keeps_the_faster():
    from atso_fast.runtimes import ProbeRuntime

    slow, fast = _FakeRuntime(1.0, 0.02), _FakeRuntime(2.0, 0.0, settle=3)
    probe = ProbeRuntime({"onnxruntime": slow, "torch": fast}, batch_size=2, timed=2)
    full, short = np.zeros((2, 1, 4)), np.zeros((1, 1, 4))
    seen = [probe(full)[0, 0, 0] for _ in range(3)]  # slow: warm-up + 2 timed
    assert seen == [1.0] * 3 and probe.active == "torch" and probe.choice is None
    assert probe(short)[0, 0, 0] == 2.0 and fast.calls == 1  # a short batch runs but is not timed
    seen = [probe(full)[0, 0, 0] for _ in range(4)]  # fast: settles on its 3rd call, then 2 timed
    assert seen == [2.0] * 4 and probe.choice == "torch"
    assert len(probe.scores["onnxruntime"]) == 2 and min(probe.scores["onnxruntime"]) >= 0.02
    assert probe(full)[0, 0, 0] == 2.0 and slow.calls == 3  # the loser is never called again
    assert list(probe._candidates) == ["torch"]


def test_auto_relabeler_on_cpu_measures_and_matches_onnxruntime(rng, tmp_path):
    net = random_net(classes=3)
    pkg = export_model(net, tmp_path / "pkg", window=(8, 8, 8), num_classes=3)
    volume = rng.standard_normal((24, 24, 24)).astype(np.float32)
    auto = Relabeler(pkg, batch_size=2, save_probabilities=True)
    assert auto.runtime_name == "auto" and auto.kernel_threads is None  # torch is probed first
    result = auto.relabel_volume(volume)  # 125 windows: 62 full batches, enough to decide
    assert auto.runtime_name in ("onnxruntime", "torch") and result.stats["runtime"] == auto.runtime_name
    assert set(auto.runtime.scores) == {"onnxruntime", "torch"}
    ref = Relabeler(pkg, runtime="onnxruntime", batch_size=2, save_probabilities=True).relabel_volume(volume)
    np.testing.assert_allclose(result.probabilities, ref.probabilities, atol=1e-5)


def test_torch_runtime_threads_hold_only_during_the_call():
    from atso_fast.runtimes import TorchRuntime

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.seen = torch.nn.Conv3d(1, 2, 1), []

        def forward(self, x):
            self.seen.append(torch.get_num_threads())
            return self.conv(x)

    before = torch.get_num_threads()
    rt = TorchRuntime(Spy(), threads=1, channels_last=False)
    rt(np.zeros((2, 1, 4, 4, 4), np.float32))
    assert rt.module.seen == [1] and torch.get_num_threads() == before


def test_auto_falls_back_to_the_runtime_that_loads(rng, tmp_path):
    pkg = export_model(random_net(classes=2), tmp_path / "pkg", window=(8, 8, 8), num_classes=2)
    (pkg / "model.pt2").write_bytes(b"not a torch program")  # e.g. written by another torch version
    with pytest.warns(RuntimeWarning, match="runtime auto: torch did not load"):
        rel = Relabeler(pkg, batch_size=2)
    assert rel.runtime_name == "onnxruntime"  # a single candidate is the choice from the start
    rel.relabel_volume(rng.standard_normal((12, 12, 12)).astype(np.float32))
    assert rel.runtime_name == "onnxruntime"


def test_archive_summary_says_when_auto_could_not_decide(rng, tmp_path):
    pkg = export_model(random_net(classes=2), tmp_path / "pkg", window=(8, 8, 8), num_classes=2)
    (tmp_path / "in").mkdir()
    for i in range(2):  # one window each: only short batches, nothing to time
        np.save(tmp_path / "in" / f"v{i}.npy", rng.standard_normal((8, 8, 8)).astype(np.float32))
    summary = Relabeler(pkg).relabel_archive(tmp_path / "in", tmp_path / "out", progress=False)
    assert summary["done"] == 2
    assert summary["runtime"] == "auto (undecided: too few full batches to measure; ran torch)"


def test_auto_probe_drops_a_candidate_that_fails_and_reruns_the_batch():
    from atso_fast.runtimes import ProbeRuntime

    class Broken(_FakeRuntime):
        def __call__(self, batch):
            self.calls += 1
            raise RuntimeError("static batch size 1")

    broken, good = Broken(1.0, 0.0), _FakeRuntime(2.0, 0.0)
    probe = ProbeRuntime({"torch": broken, "onnxruntime": good}, batch_size=2)
    with pytest.warns(RuntimeWarning, match="runtime auto: torch failed on a batch of 2 windows"):
        out = probe(np.zeros((2, 1, 4)))
    assert out[0, 0, 0] == 2.0 and probe.choice == "onnxruntime" and broken.calls == 1
    lone = ProbeRuntime({"onnxruntime": Broken(1.0, 0.0)}, batch_size=2)
    with pytest.raises(RuntimeError, match="static batch size 1"):  # nothing left to fall back on
        lone(np.zeros((2, 1, 4)))
