"""Runtimes on their own: the declared interface (``atso_fast.runtimes.base.Runtime``), each
runtime's contract, the torch layout probe and ``auto``'s measuring probe."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from atso_fast import export_model
from atso_fast.package import load_package
from atso_fast.runtimes import (
    RUNTIMES,
    OnnxRuntime,
    ProbeRuntime,
    Runtime,
    RuntimeUnavailable,
    TorchRuntime,
    create_runtime,
    resolve_runtime,
)


def random_net(in_ch=1, classes=3, dims=3, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    return torch.nn.Sequential(conv(in_ch, 8, 3, padding=1), torch.nn.Tanh(), conv(8, classes, 1)).eval()


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return load_package(export_model(random_net(classes=3), tmp_path_factory.mktemp("pkg"), window=(8, 8, 8),
                                     num_classes=3))


@pytest.mark.parametrize("name", ["onnxruntime", "torch", "auto"])
def test_every_runtime_declares_the_interface(package, rng, name):
    rt = create_runtime(name, package=package, batch_size=2)
    assert isinstance(rt, Runtime)
    assert rt.name == name and rt.device == "cpu" and rt.precision == "float32"
    batch = rng.standard_normal((2, 1, 8, 8, 8)).astype(np.float32)
    out = rt(batch)
    assert out.shape == (2, 3, 8, 8, 8) and out.dtype == np.float32 and out.flags.c_contiguous
    want = random_net(classes=3)(torch.from_numpy(batch)).detach().numpy()
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    if name == "auto":
        assert rt.choice is None and rt.active in ("torch", "onnxruntime") and not rt.settled
    else:
        assert rt.choice == rt.active == name


def test_fixed_runtimes_settle_after_their_first_call(package, rng):
    batch = rng.standard_normal((2, 1, 8, 8, 8)).astype(np.float32)
    ort = OnnxRuntime(package.onnx_path)
    assert not ort.settled
    ort(batch)
    assert ort.settled
    fixed = TorchRuntime(random_net(), channels_last=False)
    fixed(batch)
    assert fixed.settled
    probing = TorchRuntime(random_net(), probe_batch=2)  # layout probe: 4 full batches
    for _ in range(3):
        probing(batch)
        assert not probing.settled
    probing(batch)
    assert probing.settled and isinstance(probing.channels_last, bool)


def test_reuse_output_contract(package, rng):
    ort = OnnxRuntime(package.onnx_path)
    batch = rng.standard_normal((2, 1, 8, 8, 8)).astype(np.float32)
    a, b = ort(batch), ort(batch)
    assert not np.shares_memory(a, b)  # default: fresh arrays
    ort.reuse_output = True
    a, b = ort(batch).copy(), ort(batch)
    assert np.shares_memory(b, ort(batch)) and np.array_equal(a, b)


def test_probe_forwards_reuse_output_to_its_candidates(package):
    probe = create_runtime("auto", package=package, batch_size=2)
    probe.reuse_output = True
    assert probe.reuse_output and all(rt.reuse_output for rt in probe._candidates.values())


@pytest.mark.parametrize("kw,want", [
    (dict(device="cpu", has_onnx=True, has_module=False, has_program=True, num_classes=3), "auto"),
    (dict(device="cpu", has_onnx=True, has_module=False, has_program=True, num_classes=17), "onnxruntime"),
    (dict(device="cpu", has_onnx=True, has_module=False, has_program=False), "onnxruntime"),
    (dict(device="cpu", has_onnx=True, has_module=False, has_program=True, precision="bfloat16"), "torch"),
    (dict(device="cpu", has_onnx=False, has_module=True), "torch"),
])
def test_auto_rules(kw, want):
    assert resolve_runtime("auto", **kw) == want


def test_unknown_runtime_is_refused():
    with pytest.raises(ValueError, match="runtime must be one of"):
        resolve_runtime("tensorflow", "cpu", has_onnx=True, has_module=False)
    assert "auto" in RUNTIMES


def test_onnxruntime_refuses_other_precisions_and_bad_files(package, tmp_path):
    with pytest.raises(ValueError, match="float32"):
        OnnxRuntime(package.onnx_path, precision="bfloat16")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.onnx: ONNX Runtime cannot load"):
        OnnxRuntime(bad)


def test_torch_runtime_without_a_program_names_the_fix(tmp_path):
    pkg = load_package(export_model(random_net(), tmp_path / "p", window=(8, 8, 8), num_classes=3, save_torch=False))
    with pytest.raises(RuntimeUnavailable, match="no torch program"):
        TorchRuntime.create(package=pkg)


def test_missing_runtimes_name_the_package():
    from atso_fast.runtimes import (
        RuntimeUnavailable,
        TensorRTRuntime,
        tensorrt_available,
    )

    if tensorrt_available():
        pytest.skip("TensorRT is installed here")
    with pytest.raises(RuntimeUnavailable, match="pip install tensorrt"):
        TensorRTRuntime("model.onnx")


@pytest.mark.parametrize("dims", [2, 3])
def test_torch_runtime_channels_last_matches_and_leaves_the_module_alone(rng, dims):
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


def test_torch_runtime_probes_the_layout_once_on_cpu(rng):
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
    rt = TorchRuntime(random_net(classes=2), probe_batch=3)
    for _ in range(4):
        rt(rng.standard_normal((1, 1, 8, 8, 8)).astype(np.float32))
    assert rt.channels_last is None and rt.layout_probe is None  # batches of 1 are no guide
    for _ in range(4):
        rt(rng.standard_normal((3, 1, 8, 8, 8)).astype(np.float32))
    assert isinstance(rt.channels_last, bool) and rt.layout_probe is not None


class _FakeRuntime:
    """Returns its tag after ``delay`` seconds; settled after ``settle`` calls (a torch-like
    layout probe when ``settle > 1``)."""

    device, precision, reuse_output = "cpu", "float32", False

    def __init__(self, tag: float, delay: float, settle: int = 1):
        self.tag, self.delay, self.settle, self.calls = tag, delay, settle, 0

    @property
    def settled(self) -> bool:
        return self.calls >= self.settle

    def __call__(self, batch):
        self.calls += 1
        time.sleep(self.delay)
        return np.full(batch.shape, self.tag, np.float32)


def test_auto_probe_times_each_candidate_then_keeps_the_faster():
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


def test_torch_runtime_threads_hold_only_during_the_call():
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


def test_auto_probe_drops_a_candidate_that_fails_and_reruns_the_batch():
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
