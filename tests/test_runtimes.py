"""Runtimes on their own: the declared interface (``atso_fast.runtimes.base.Runtime``), each
runtime's contract (OpenVINO: precision, disk cache, asynchronous requests), the torch layout
probe and ``auto``'s rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atso_fast import export_model
from atso_fast.package import load_package
from atso_fast.runtimes import (
    RUNTIMES,
    OnnxRuntime,
    OpenVinoRuntime,
    Pending,
    Runtime,
    RuntimeUnavailable,
    TorchRuntime,
    auto_candidates,
    create_runtime,
    load_runtime,
    openvino_rt,
    resolve_runtime,
)
from atso_fast.runtimes.openvino_rt import (
    compiled_cache_key,
    openvino_available,
    openvino_supports,
)

needs_openvino = pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")


def random_net(in_ch=1, classes=3, dims=3, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    return torch.nn.Sequential(conv(in_ch, 8, 3, padding=1), torch.nn.Tanh(), conv(8, classes, 1)).eval()


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return load_package(
        export_model(random_net(classes=3), tmp_path_factory.mktemp("pkg"), window=(8, 8, 8), num_classes=3)
    )


@pytest.mark.parametrize("name", ["onnxruntime", "torch", pytest.param("openvino", marks=needs_openvino)])
def test_every_runtime_declares_the_interface(package, rng, name):
    rt = create_runtime(name, package=package, batch_size=2)
    assert isinstance(rt, Runtime)
    assert rt.name == name and rt.device == "cpu" and rt.precision == "float32"
    batch = rng.standard_normal((2, 1, 8, 8, 8)).astype(np.float32)
    out = rt(batch)
    assert out.shape == (2, 3, 8, 8, 8) and out.dtype == np.float32 and out.flags.c_contiguous
    want = random_net(classes=3)(torch.from_numpy(batch)).detach().numpy()
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    assert rt.in_flight >= 1
    assert rt.streams >= 1 and isinstance(rt.dynamic_batch, bool)
    assert rt.streams == 1 or name == "openvino"  # only OpenVINO computes batches side by side
    pending = rt.submit(batch)
    assert isinstance(pending, Pending)
    np.testing.assert_allclose(pending.result(), want, rtol=1e-4, atol=1e-5)


def test_every_runtime_class_declares_streams_and_dynamic_batch():
    from atso_fast.runtimes import TensorRTRuntime
    from atso_fast.runtimes.base import FixedRuntime

    assert FixedRuntime.streams == 1 and FixedRuntime.dynamic_batch is False
    for cls in (OnnxRuntime, TorchRuntime, TensorRTRuntime, OpenVinoRuntime):
        assert issubclass(cls, FixedRuntime)  # a runtime's own value, else FixedRuntime's
        assert isinstance(cls.streams, int) and isinstance(cls.dynamic_batch, bool)


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


@pytest.mark.parametrize(
    "kw,want",
    [
        (dict(device="cpu", has_onnx=True, has_module=False, has_program=True), ["onnxruntime", "torch"]),
        (dict(device="cpu", has_onnx=True, has_module=False, has_program=False), ["onnxruntime"]),
        (dict(device="cpu", has_onnx=True, has_module=False, has_program=True, precision="bfloat16"), ["torch"]),
        (dict(device="cpu", has_onnx=False, has_module=True), ["torch"]),
    ],
)
def test_auto_rules_without_openvino(monkeypatch, kw, want):
    monkeypatch.setattr("atso_fast.runtimes.openvino_available", lambda: False)
    assert auto_candidates(**kw) == want
    assert resolve_runtime("auto", **kw) == want[0]


@needs_openvino
def test_auto_puts_openvino_first_on_cpu():
    cpu = dict(device="cpu", has_onnx=True, has_module=False)
    assert auto_candidates(**cpu) == ["openvino", "onnxruntime", "torch"]
    assert auto_candidates(**cpu, has_program=False) == ["openvino", "onnxruntime"]
    bf16 = auto_candidates(**cpu, precision="bfloat16")
    assert bf16 == (["openvino", "torch"] if openvino_supports("bfloat16") else ["torch"])
    assert auto_candidates("cpu", has_onnx=True, has_module=True) == ["torch"]  # a live module


def test_load_runtime_warns_and_takes_the_next_candidate(package, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("model.onnx: unsupported operator")

    monkeypatch.setattr("atso_fast.runtimes.OpenVinoRuntime", broken)
    with pytest.warns(
        RuntimeWarning, match="runtime auto: openvino did not load .*unsupported operator.*running onnxruntime"
    ):
        rt = load_runtime(["openvino", "onnxruntime"], package=package, batch_size=2)
    assert rt.name == "onnxruntime"
    with pytest.raises(ValueError, match="unsupported operator"):  # nothing else to take
        load_runtime(["openvino"], package=package)


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


def test_torch_bfloat16_on_the_host_returns_the_networks_bfloat16_windows(rng):
    """No float32 copy: the kernels read ml_dtypes.bfloat16 windows as they are."""
    import ml_dtypes

    net = random_net()
    batch = rng.standard_normal((2, 1, 8, 8, 8)).astype(np.float32)
    out = TorchRuntime(net, precision="bfloat16", channels_last=False)(batch)
    assert out.dtype == ml_dtypes.bfloat16 and out.flags.c_contiguous
    with torch.inference_mode():
        want = net.to(torch.bfloat16)(torch.from_numpy(batch).to(torch.bfloat16)).float().numpy()
    np.testing.assert_array_equal(out.astype(np.float32), want)


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


# --------------------------------------------------------------------------- OpenVINO
def _batch(rng, n=2):
    return rng.standard_normal((n, 1, 8, 8, 8)).astype(np.float32)


def _openvino(package, tmp_path, **kw):
    kw = {"batch_size": 2, "window": package.window, "in_channels": 1, "cache_dir": tmp_path / "cache", **kw}
    return OpenVinoRuntime(package.onnx_path, **kw)


@needs_openvino
def test_openvino_float32_is_float32_and_threads_map_to_its_thread_count(package, rng, tmp_path):
    rt = _openvino(package, tmp_path, threads=1)
    compiled = rt.compiled
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    batch = _batch(rng)
    want = random_net(classes=3)(torch.from_numpy(batch)).detach().numpy()
    np.testing.assert_allclose(rt(batch), want, rtol=1e-4, atol=1e-5)


@needs_openvino
def test_openvino_runs_short_batches_at_their_own_size(package, rng, tmp_path):
    rt = _openvino(package, tmp_path, batch_size=3, in_flight=1)  # one request: _slots[0]
    assert rt.dynamic_batch and str(rt.compiled.input(0).get_partial_shape()) == "[1..3,1,8,8,8]"
    batch = _batch(rng, 3)
    full = rt(batch).copy()
    for n in (1, 2):
        short = rt(batch[:n])
        request = rt._slots[0].request
        assert short.shape == (n, 3, 8, 8, 8)
        assert tuple(request.get_input_tensor(0).shape) == (n, 1, 8, 8, 8)  # no padded windows ran
        assert tuple(request.get_output_tensor(0).shape) == (n, 3, 8, 8, 8)
        np.testing.assert_allclose(short, full[:n], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"compiled for batches \(<= 3, 1, 8, 8, 8\), got \(4, 1, 8, 8, 8\)"):
        rt(_batch(rng, 4))


@needs_openvino
def test_openvino_static_batch_pads_short_batches_to_the_compiled_one(package, rng, tmp_path):
    rt = _openvino(package, tmp_path, batch_size=3, dynamic_batch=False, in_flight=1)
    assert str(rt.compiled.input(0).get_partial_shape()) == "[3,1,8,8,8]"
    batch = _batch(rng, 3)
    full, short = rt(batch).copy(), rt(batch[:1])
    assert short.shape == (1, 3, 8, 8, 8)
    assert tuple(rt._slots[0].request.get_input_tensor(0).shape) == (3, 1, 8, 8, 8)  # padded
    np.testing.assert_allclose(short, full[:1], rtol=1e-5, atol=1e-6)
    dynamic = _openvino(package, tmp_path, batch_size=3)
    np.testing.assert_allclose(dynamic(batch), full, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"compiled for batches \(<= 3, 1, 8, 8, 8\), got \(4, 1, 8, 8, 8\)"):
        rt(_batch(rng, 4))


@needs_openvino
def test_openvino_two_requests_in_flight_each_with_its_own_output(package, rng, tmp_path):
    rt = _openvino(package, tmp_path, streams=1)
    rt.reuse_output = True
    assert rt.in_flight == 2  # the default for small outputs on one stream
    a, b = _batch(rng), _batch(rng)
    want_a, want_b = rt(a).copy(), rt(b).copy()
    pa, pb = rt.submit(a), rt.submit(b)  # both on the network before either result is taken
    with pytest.raises(RuntimeError, match="more than in_flight=2 batches pending"):
        rt.submit(a)
    out_a, out_b = pa.result(), pb.result()
    assert not np.shares_memory(out_a, out_b)
    np.testing.assert_array_equal(out_a, want_a)  # same request or not: the same numbers
    np.testing.assert_array_equal(out_b, want_b)
    rt.submit(b).result()  # reuses a's request: a's reused output buffer now holds b's windows
    np.testing.assert_array_equal(out_a, want_b)
    rt.reuse_output = False
    fresh = rt(a)
    assert not np.shares_memory(fresh, rt(b))


@needs_openvino
def test_openvino_caches_the_compiled_model_on_disk(package, rng, tmp_path, monkeypatch):
    first = _openvino(package, tmp_path)
    blobs = list((tmp_path / "cache").glob("*.blob"))
    assert len(blobs) == 1
    batch = _batch(rng)
    want = first(batch).copy()

    def no_build(*args, **kwargs):
        raise AssertionError("compiled again although the cache holds the model")

    monkeypatch.setattr(OpenVinoRuntime, "_build", no_build)
    np.testing.assert_array_equal(_openvino(package, tmp_path)(batch), want)  # loaded from the cache
    monkeypatch.undo()
    blobs[0].write_bytes(b"damaged")  # a damaged blob is rebuilt and replaced
    np.testing.assert_array_equal(_openvino(package, tmp_path)(batch), want)
    assert blobs[0].stat().st_size > 1000
    _openvino(package, tmp_path, batch_size=3)
    assert len(list((tmp_path / "cache").glob("*.blob"))) == 2  # the batch is part of the key
    _openvino(package, tmp_path, dynamic_batch=False)
    assert len(list((tmp_path / "cache").glob("*.blob"))) == 3  # and whether it is dynamic
    assert not list((tmp_path / "cache").glob(".*tmp"))  # written atomically, no temp left


@needs_openvino
def test_openvino_cached_dynamic_model_keeps_its_dynamic_batch(package, rng, tmp_path, monkeypatch):
    batch = _batch(rng, 2)
    want = _openvino(package, tmp_path, streams=1)(batch).copy()  # compiled and cached
    monkeypatch.setattr(OpenVinoRuntime, "_build", lambda *a: pytest.fail("compiled again despite the cache"))
    rt = _openvino(package, tmp_path, streams=1, in_flight=1)
    assert str(rt.compiled.input(0).get_partial_shape()) == "[1..2,1,8,8,8]"
    np.testing.assert_array_equal(rt(batch), want)
    short = rt(batch[:1])
    assert tuple(rt._slots[0].request.get_input_tensor(0).shape) == (1, 1, 8, 8, 8)
    np.testing.assert_allclose(short, want[:1], rtol=1e-5, atol=1e-6)


def test_openvino_cache_key_covers_model_version_device_precision_and_shape():
    base = compiled_cache_key(b"onnx", "2026.4", "cpu x", "float32", (4, 1, 8, 8, 8))
    others = [
        compiled_cache_key(b"onnx2", "2026.4", "cpu x", "float32", (4, 1, 8, 8, 8)),
        compiled_cache_key(b"onnx", "2026.5", "cpu x", "float32", (4, 1, 8, 8, 8)),
        compiled_cache_key(b"onnx", "2026.4", "cpu y", "float32", (4, 1, 8, 8, 8)),
        compiled_cache_key(b"onnx", "2026.4", "cpu x", "bfloat16", (4, 1, 8, 8, 8)),
        compiled_cache_key(b"onnx", "2026.4", "cpu x", "float32", (2, 1, 8, 8, 8)),
        compiled_cache_key(b"onnx", "2026.4", "cpu x", "float32", ("1..4", 1, 8, 8, 8)),
    ]
    assert len({base, *others}) == 7


@needs_openvino
def test_openvino_low_precisions_need_the_cpu_capability(package, rng, tmp_path):
    for precision in ("bfloat16", "float16"):
        if not openvino_supports(precision):
            with pytest.raises(ValueError, match=f"does not support {precision}"):
                _openvino(package, tmp_path, precision=precision)
            continue
        rt = _openvino(package, tmp_path, precision=precision)
        batch = _batch(rng)
        want = random_net(classes=3)(torch.from_numpy(batch)).detach().numpy()
        np.testing.assert_allclose(rt(batch), want, atol=0.05)  # 8 (bf16) / 11 (fp16) mantissa bits


@needs_openvino
def test_openvino_refuses_bad_models_and_devices(package, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.onnx: OpenVINO cannot compile the model"):
        OpenVinoRuntime(bad, window=(8, 8, 8), cache_dir=False)
    with pytest.raises(ValueError, match="takes host arrays"):
        OpenVinoRuntime(package.onnx_path, device="cuda", window=(8, 8, 8))
    for bad in (0, 4):
        with pytest.raises(ValueError, match=f"in_flight must be 1 to 3, got {bad}"):
            _openvino(package, tmp_path, in_flight=bad)


@needs_openvino
def test_openvino_two_streams_run_requests_side_by_side_with_the_same_numbers(package, rng, tmp_path):
    one, two = _openvino(package, tmp_path, streams=1), _openvino(package, tmp_path, streams=2, threads=2)
    assert two.compiled.get_property("NUM_STREAMS") == 2 and len(list((tmp_path / "cache").glob("*.blob"))) == 2
    a, b = _batch(rng), _batch(rng)
    pa, pb = two.submit(a), two.submit(b)
    np.testing.assert_allclose(pa.result(), one(a), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pb.result(), one(b), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="streams must be 1 or 2"):
        _openvino(package, tmp_path, streams=3)


@needs_openvino
def test_openvino_defaults_one_stream_two_in_flight_and_two_streams_three(package, rng, tmp_path):
    one = _openvino(package, tmp_path, threads=2)  # output: 2 x 3 x 8^3 x 4 B = 12 KiB
    assert (one.streams, one.in_flight) == (1, 2)
    rt = _openvino(package, tmp_path, threads=2, streams=2)
    assert (rt.streams, rt.in_flight) == (2, 3) and rt.compiled.get_property("NUM_STREAMS") == 2
    rt.reuse_output = True
    batches = [_batch(rng) for _ in range(4)]
    want = [_openvino(package, tmp_path, streams=1, in_flight=1)(b) for b in batches]
    pending = [rt.submit(b) for b in batches[:3]]  # two on the streams, one waiting
    with pytest.raises(RuntimeError, match="more than in_flight=3 batches pending"):
        rt.submit(batches[3])
    outs = [p.result() for p in pending]
    assert not any(np.shares_memory(a, b) for i, a in enumerate(outs) for b in outs[i + 1 :])
    for out, w in zip(outs, want):
        np.testing.assert_allclose(out, w, rtol=1e-5, atol=1e-6)
    one = _openvino(package, tmp_path, threads=1)
    assert (one.streams, one.in_flight) == (1, 2)


@needs_openvino
def test_openvino_runs_one_batch_at_a_time_when_outputs_are_large(package, tmp_path, monkeypatch):
    monkeypatch.setattr(openvino_rt, "PIPELINE_MAX_OUTPUT_BYTES", 1000)  # this output: 2 x 3 x 8^3 x 4 B
    rt = _openvino(package, tmp_path)
    assert rt.in_flight == 1 and rt.streams == 1
    rt.in_flight = 2
    pending = rt.submit(np.zeros((2, 1, 8, 8, 8), np.float32))
    with pytest.raises(RuntimeError, match="changed while batches are pending"):
        rt.in_flight = 1
    pending.result()


@needs_openvino
def test_openvino_unwritable_cache_only_warns(package, rng, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would go")
    with pytest.warns(RuntimeWarning, match="compiled model not cached"):
        rt = OpenVinoRuntime(package.onnx_path, batch_size=2, window=(8, 8, 8), cache_dir=blocked / "cache")
    assert rt(_batch(rng)).shape == (2, 3, 8, 8, 8)


def test_missing_openvino_names_the_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino":
            raise ImportError("no openvino here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    openvino_rt._core.cache_clear()
    try:
        assert not openvino_available()
        with pytest.raises(RuntimeUnavailable, match="pip install openvino"):
            OpenVinoRuntime("model.onnx")
    finally:
        monkeypatch.undo()
        openvino_rt._core.cache_clear()
