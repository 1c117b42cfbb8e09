"""Relabel engine: MONAI equivalence, known-answer predictors, streaming memory, options."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch

from atso_fast import Relabeler, export_model, load_package
from atso_fast.engine.relabeler import NonFiniteInputError
from atso_fast.engine.windows import batch_bounds
from atso_fast.package import PackageError
from atso_fast.runtimes import Ready
from atso_fast.runtimes.openvino_rt import openvino_available, openvino_supports

needs_openvino = pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")
CPU_DEFAULT = "openvino" if openvino_available() else "onnxruntime"
"""What ``auto`` runs on CPU for a float32 package here."""


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
        logits = inferers.sliding_window_inference(
            torch.from_numpy(volume)[None], roi, 4, net, overlap=overlap, mode="gaussian", sigma_scale=0.125
        )
    return torch.softmax(logits, 1)[0].numpy() if classes > 1 else torch.sigmoid(logits)[0].numpy()


@pytest.mark.parametrize(
    "shape,roi,overlap,batch",
    [
        ((40, 50, 45), (16, 24, 20), 0.5, 3),
        ((40, 50, 45), (16, 24, 20), 0.5, 5),  # batches span two rows of windows
        ((40, 50, 45), (16, 24, 20), 0.5, 100),  # one batch holds every window
        ((10, 21, 33), (16, 16, 16), 0.25, 3),  # smaller than the window along z and y
        ((33, 17, 20), (8, 8, 8), 0.0, 4),
    ],
)
def test_matches_monai_sliding_window(rng, shape, roi, overlap, batch):
    net = random_net()
    volume = rng.standard_normal((1, *shape)).astype(np.float32)
    want = monai_probs(net, volume, roi, overlap, 3)
    rel = Relabeler.from_module(
        net, window=roi, num_classes=3, overlap=overlap, batch_size=batch, save_probabilities=True
    )
    got = rel.relabel_volume(volume)
    np.testing.assert_allclose(got.probabilities, want, rtol=1e-5, atol=2e-6)
    agree = (got.labels == want.argmax(0)).mean()
    assert agree >= 0.9999, agree
    assert got.labels.shape == shape and got.labels.dtype == np.uint8


def test_known_answer_plus_one(rng):
    volume = rng.standard_normal((23, 31, 19)).astype(np.float32)
    rel = Relabeler.from_module(
        PlusOne(), window=(8, 16, 8), num_classes=1, kind="probabilities", overlap=0.5, save_probabilities=True
    )
    got = rel.relabel_volume(volume)
    np.testing.assert_allclose(got.probabilities[0], volume + 1, rtol=1e-5, atol=1e-5)
    assert (got.labels == ((volume + 1) > 0.5)).mean() > 0.999


def test_accumulator_holds_one_window_depth(rng, monkeypatch):
    from atso_fast.engine.merger import ArrayBackend

    shapes = []
    real_zeros = ArrayBackend.zeros
    monkeypatch.setattr(
        ArrayBackend, "zeros", lambda self, shape, dtype: shapes.append(shape) or real_zeros(self, shape, dtype)
    )
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
    rel = Relabeler.from_module(
        net, window=(8, 16, 16), num_classes=3, threshold=0.6, ignore_index=9, save_probabilities=True
    )
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
    pkg_dir = export_model(
        net,
        tmp_path / "pkg",
        window=(8, 16, 16),
        num_classes=3,
        normalization={"scheme": "zscore"},
        class_names=["bg", "a", "b"],
    )
    meta = json.loads((pkg_dir / "model.json").read_text())
    assert meta["window"] == [8, 16, 16] and meta["num_classes"] == 3 and meta["kind"] == "logits"
    assert meta["normalization"] == {"scheme": "zscore"} and meta["onnx_max_abs_diff"] < 1e-4
    volume = (rng.standard_normal((20, 30, 30)) * 50 + 100).astype(np.float32)
    onnx = Relabeler(pkg_dir, runtime="onnxruntime", save_probabilities=True).relabel_volume(volume)
    live = Relabeler.from_module(
        net, window=(8, 16, 16), num_classes=3, normalization={"scheme": "zscore"}, save_probabilities=True
    ).relabel_volume(volume)
    np.testing.assert_allclose(onnx.probabilities, live.probabilities, atol=1e-5)
    assert Relabeler(pkg_dir, runtime="auto").runtime_name == CPU_DEFAULT
    bf16 = "openvino" if openvino_available() and openvino_supports("bfloat16") else "torch"
    assert Relabeler(pkg_dir, precision="bfloat16").runtime_name == bf16  # ORT runs float32 only
    (pkg_dir / "model.pt2").unlink()
    assert Relabeler(pkg_dir).runtime_name == CPU_DEFAULT  # onnx only


def test_torch_runtime_from_package(tmp_path, rng):
    net = random_net(classes=2)
    pkg_dir = export_model(net, tmp_path / "pkg", window=(8, 8, 8), num_classes=2)
    assert load_package(pkg_dir).torch_file is not None  # a plain conv net always exports
    vol = rng.standard_normal((10, 12, 12)).astype(np.float32)
    a = Relabeler(pkg_dir, runtime="torch").relabel_volume(vol)
    b = Relabeler(pkg_dir, runtime="onnxruntime").relabel_volume(vol)
    assert (a.labels == b.labels).mean() > 0.999


def test_broken_packages_name_file_and_problem(tmp_path):
    net = random_net(classes=2)
    pkg = export_model(net, tmp_path / "pkg", window=(8, 8, 8), num_classes=2)
    (pkg / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ValueError, match=r"model.onnx: sha256 \w+ differs from onnx_sha256"):
        Relabeler(pkg, runtime="onnxruntime")  # refused when the package loads (issue 14)
    meta = json.loads((pkg / "model.json").read_text())
    meta["num_classes"] = 0
    (pkg / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match=r"model.json: num_classes must be an integer in \[1, 65535\]"):
        load_package(pkg)
    with pytest.raises(PackageError, match="not found"):
        load_package(tmp_path / "missing")
    with pytest.raises(PackageError, match=r"expected \(1, 5, 8, 8, 8\)"):
        export_model(net, tmp_path / "bad", window=(8, 8, 8), num_classes=5)


def test_compile_needs_the_torch_runtime(tmp_path):
    pkg = export_model(random_net(classes=2), tmp_path / "pkg", window=(8, 8, 8), num_classes=2)
    with pytest.raises(ValueError, match="compile=True compiles the torch runtime"):
        Relabeler(pkg, runtime="onnxruntime", compile=True)
    assert Relabeler(pkg, compile=True).runtime_name == "torch"  # auto + compile -> torch


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


@needs_openvino
def test_pipelined_openvino_runs_kernels_on_one_thread(tmp_path):
    pkg = export_model(random_net(classes=2), tmp_path / "pkg", window=(8, 8, 8), num_classes=2, save_torch=False)
    rel = Relabeler(pkg, runtime="openvino", threads=2)
    assert (rel.runtime.streams, rel.runtime.in_flight) == (1, 2) and rel.kernel_threads == 1
    rel.runtime.in_flight = 3
    assert rel.kernel_threads == 1
    rel.runtime.in_flight = 1  # kernels run between batches: the OpenMP default
    assert rel.kernel_threads is None


def test_auto_relabeler_on_cpu_matches_onnxruntime(rng, tmp_path):
    pkg = export_model(random_net(classes=3), tmp_path / "pkg", window=(8, 8, 8), num_classes=3)
    volume = rng.standard_normal((24, 24, 24)).astype(np.float32)
    auto = Relabeler(pkg, batch_size=2, save_probabilities=True)
    assert auto.runtime_name == CPU_DEFAULT
    result = auto.relabel_volume(volume)
    assert result.stats["runtime"] == CPU_DEFAULT
    ref = Relabeler(pkg, runtime="onnxruntime", batch_size=2, save_probabilities=True).relabel_volume(volume)
    np.testing.assert_allclose(result.probabilities, ref.probabilities, atol=1e-5)
    assert (result.labels == ref.labels).mean() >= 0.9999


@needs_openvino
def test_auto_falls_back_when_openvino_cannot_load_the_model(rng, tmp_path, monkeypatch):
    from atso_fast.runtimes import OpenVinoRuntime

    def unsupported(self, core, shape):
        raise ValueError(f"{self.onnx_path}: OpenVINO cannot compile the model (unsupported operator)")

    monkeypatch.setattr(OpenVinoRuntime, "_build", unsupported)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing cached: it must compile
    pkg = export_model(random_net(classes=2), tmp_path / "pkg", window=(8, 8, 8), num_classes=2)
    with pytest.warns(RuntimeWarning, match="runtime auto: openvino did not load .*running onnxruntime"):
        rel = Relabeler(pkg, batch_size=2)
    assert rel.runtime_name == "onnxruntime"
    rel.relabel_volume(rng.standard_normal((12, 12, 12)).astype(np.float32))
    with pytest.raises(ValueError, match="unsupported operator"):  # asked for by name: no fallback
        Relabeler(pkg, runtime="openvino")


def test_archive_summary_names_the_runtime_auto_chose(rng, tmp_path):
    pkg = export_model(random_net(classes=2), tmp_path / "pkg", window=(8, 8, 8), num_classes=2)
    (tmp_path / "in").mkdir()
    for i in range(2):
        np.save(tmp_path / "in" / f"v{i}.npy", rng.standard_normal((8, 8, 8)).astype(np.float32))
    summary = Relabeler(pkg).relabel_archive(tmp_path / "in", tmp_path / "out", progress=False)
    assert summary["done"] == 2 and summary["runtime"] == CPU_DEFAULT


# --------------------------------------------------------------------------- OpenVINO, pipelined
@needs_openvino
@pytest.mark.parametrize(
    "shape,roi,overlap,batch",
    [
        ((40, 50, 45), (16, 24, 20), 0.5, 3),
        ((40, 50, 45), (16, 24, 20), 0.5, 5),  # batches span two rows of windows; short last batch
        ((40, 50, 45), (16, 24, 20), 0.5, 100),  # one batch holds every window
        ((10, 21, 33), (16, 16, 16), 0.25, 3),  # smaller than the window along z and y
        ((33, 17, 20), (8, 8, 8), 0.0, 4),
    ],
)
def test_openvino_float32_matches_monai_sliding_window(rng, tmp_path, shape, roi, overlap, batch):
    """Tolerance of OpenVINO float32: probabilities within 2e-5 of MONAI's, labels >= 99.99%."""
    net = random_net()
    volume = rng.standard_normal((1, *shape)).astype(np.float32)
    want = monai_probs(net, volume, roi, overlap, 3)
    pkg = export_model(net, tmp_path / "pkg", window=roi, num_classes=3, save_torch=False)
    rel = Relabeler(pkg, runtime="openvino", overlap=overlap, batch_size=batch, save_probabilities=True)
    got = rel.relabel_volume(volume, normalized=True)
    np.testing.assert_allclose(got.probabilities, want, rtol=1e-4, atol=2e-5)
    assert (got.labels == want.argmax(0)).mean() >= 0.9999


@needs_openvino
@pytest.mark.parametrize(
    "batch,mirror,streams,depth",
    [(3, False, 2, 3), (4, False, 2, 3), (4, False, 1, 2), (3, True, 2, 3), (3, False, 1, 3)],
)
def test_pipelined_labels_are_bit_identical_to_sequential(rng, tmp_path, batch, mirror, streams, depth):
    """``depth`` batches in flight on one or two streams vs one at a time, same compiled model."""
    from atso_fast.runtimes import OpenVinoRuntime

    pkg = export_model(random_net(classes=4), tmp_path / "pkg", window=(8, 16, 16), num_classes=4, save_torch=False)
    volume = rng.standard_normal((30, 41, 37)).astype(np.float32)
    rel = Relabeler(pkg, runtime="openvino", batch_size=batch, mirror=mirror, save_probabilities=True, threads=2)
    assert (rel.runtime.streams, rel.runtime.in_flight) == (1, 2) and rel.runtime.reuse_output  # the defaults
    if streams == 2:
        rel.runtime = OpenVinoRuntime(pkg / "model.onnx", batch_size=batch, window=(8, 16, 16), threads=2, streams=2)
        rel.runtime.reuse_output = True
    rel.runtime.in_flight = depth
    a = rel.relabel_volume(volume)
    rel.runtime.in_flight = 1
    b = rel.relabel_volume(volume)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.confidence, b.confidence)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    assert a.stats["windows"] == b.stats["windows"]


def test_pipelined_stream_keeps_each_input_until_its_result(rng):
    """Two batches in flight read two window buffers: the engine never overwrites one that a
    pending batch still reads (this runtime reads its input only when the result is taken)."""

    class LateReader:
        name, device, precision, reuse_output, in_flight = "late", "cpu", "float32", False, 2
        streams, dynamic_batch = 1, False
        settled = True

        def __call__(self, batch):
            return np.repeat(np.tanh(batch), 2, axis=1)

        def submit(self, batch):
            runtime = self

            class Late:
                def result(self):
                    return runtime(batch)

            return Late()

    rel = Relabeler.from_module(_TanhTwice(), window=(8, 8, 8), num_classes=2, batch_size=2, save_probabilities=True)
    volume = rng.standard_normal((20, 20, 20)).astype(np.float32)
    want = rel.relabel_volume(volume)  # torch, one batch at a time
    rel.runtime = LateReader()
    got = rel.relabel_volume(volume)
    np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=1e-6, atol=1e-7)


class _TanhTwice(torch.nn.Module):
    def forward(self, x):
        return torch.tanh(x).repeat(1, 2, 1, 1, 1)


class _Recording:
    """A batch-invariant NumPy runtime (each window's output depends on that window alone) that
    records the batch sizes it ran."""

    name, device, precision, reuse_output, in_flight, streams = "recording", "cpu", "float32", False, 1, 1
    settled = True

    def __init__(self, dynamic_batch):
        self.dynamic_batch, self.sizes = dynamic_batch, []

    def __call__(self, batch):
        self.sizes.append(len(batch))
        return np.concatenate([np.tanh(batch), np.sin(3 * batch)], axis=1)

    def submit(self, batch):
        return Ready(self(batch))


@pytest.mark.parametrize("shape,batch", [((20, 20, 20), 4), ((20, 28, 20), 4), ((12, 12, 12), 3), ((20, 20, 20), 1)])
def test_even_batches_blend_bit_identically_to_monai_batches(rng, shape, batch):
    rel = Relabeler.from_module(
        _TanhTwice(), window=(8, 8, 8), num_classes=2, batch_size=batch, save_probabilities=True
    )
    volume = rng.standard_normal(shape).astype(np.float32)
    results, sizes = [], []
    for dynamic in (False, True):
        rel.runtime = _Recording(dynamic)
        results.append(rel.relabel_volume(volume))
        sizes.append(rel.runtime.sizes)
    n = results[0].stats["windows"]
    assert sizes[0] == [batch] * (n // batch) + ([n % batch] if n % batch else [])  # MONAI's batches
    assert sizes[1] == [hi - lo for lo, hi in batch_bounds(n, batch)] and len(sizes[1]) == len(sizes[0])
    np.testing.assert_array_equal(results[1].probabilities, results[0].probabilities)
    np.testing.assert_array_equal(results[1].labels, results[0].labels)
    np.testing.assert_array_equal(results[1].confidence, results[0].confidence)


class _Bf16Out(_Recording):
    """_Recording's outputs rounded to bfloat16, handed over as bfloat16 or as their float32 copy."""

    def __init__(self, as_bf16):
        super().__init__(False)
        self.as_bf16 = as_bf16

    def __call__(self, batch):
        out = super().__call__(batch).astype(ml_dtypes.bfloat16)
        return out if self.as_bf16 else out.astype(np.float32)


def test_bfloat16_runtime_outputs_blend_like_their_float32_values(rng):
    """A runtime may return bfloat16 windows (OpenVINO in bfloat16): the engine blends them as
    they are, with the very numbers of their exact float32 copy."""
    rel = Relabeler.from_module(_TanhTwice(), window=(8, 8, 8), num_classes=2, batch_size=3, save_probabilities=True)
    volume = rng.standard_normal((20, 17, 22)).astype(np.float32)
    results = []
    for as_bf16 in (False, True):
        rel.runtime = _Bf16Out(as_bf16)
        results.append(rel.relabel_volume(volume))
    np.testing.assert_array_equal(results[1].probabilities, results[0].probabilities)
    np.testing.assert_array_equal(results[1].labels, results[0].labels)


@needs_openvino
@pytest.mark.skipif(not openvino_supports("bfloat16"), reason="this CPU has no bfloat16 (AVX512-BF16/AMX)")
def test_openvino_bfloat16_returns_bfloat16_windows_close_to_float32(rng, tmp_path):
    net = random_net()
    volume = rng.standard_normal((1, 30, 34, 28)).astype(np.float32)
    pkg = export_model(net, tmp_path / "pkg", window=(16, 16, 16), num_classes=3, save_torch=False)
    f32 = Relabeler(pkg, runtime="openvino", batch_size=4).relabel_volume(volume, normalized=True)
    for _ in range(2):  # compiled, then from the disk cache: a bf16 output both times
        rel = Relabeler(pkg, runtime="openvino", precision="bfloat16", batch_size=4)
        assert rel.runtime.submit(np.zeros((2, 1, 16, 16, 16), np.float32)).result().dtype == ml_dtypes.bfloat16
        bf16 = rel.relabel_volume(volume, normalized=True)
        assert (bf16.labels == f32.labels).mean() >= 0.995


@needs_openvino
@pytest.mark.parametrize(
    "shape,roi,batch",
    [
        ((40, 50, 45), (16, 24, 20), 6),  # 64 windows: 9 x 6, 2 x 5
        ((33, 17, 20), (8, 8, 8), 5),
    ],
)  # 128: 24 x 5, 2 x 4
def test_openvino_even_dynamic_batches_match_static_padded_ones(rng, tmp_path, monkeypatch, shape, roi, batch):
    """Dynamic batch + even split vs the static padded model in MONAI's batches: probabilities
    within OpenVINO float32's tolerance of each other and of MONAI, labels >= 99.99% identical."""
    from atso_fast.runtimes import OpenVinoRuntime

    net = random_net()
    volume = rng.standard_normal((1, *shape)).astype(np.float32)
    pkg = export_model(net, tmp_path / "pkg", window=roi, num_classes=3, save_torch=False)
    dynamic = Relabeler(pkg, runtime="openvino", batch_size=batch, save_probabilities=True)
    static = Relabeler(pkg, runtime="openvino", batch_size=batch, save_probabilities=True)
    static.runtime = OpenVinoRuntime(pkg / "model.onnx", batch_size=batch, window=roi, dynamic_batch=False)
    static.runtime.reuse_output = True
    seen = []
    submit = dynamic.runtime.submit
    monkeypatch.setattr(dynamic.runtime, "submit", lambda x: seen.append(len(x)) or submit(x))
    a, b = dynamic.relabel_volume(volume, normalized=True), static.relabel_volume(volume, normalized=True)
    n = a.stats["windows"]
    assert n % batch and seen == [hi - lo for lo, hi in batch_bounds(n, batch)]  # even, at their size
    np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-4, atol=2e-5)
    assert (a.labels == b.labels).mean() >= 0.9999
    want = monai_probs(net, volume, roi, 0.5, 3)
    np.testing.assert_allclose(a.probabilities, want, rtol=1e-4, atol=2e-5)
    assert (a.labels == want.argmax(0)).mean() >= 0.9999
