"""pytest-benchmark suites: native kernels and the relabel pass, each checked before it is timed.

Every test first compares the native result with ``atso_fast.kernels.reference`` (or with labels known
by construction) and only then hands the call to the ``benchmark`` fixture. No timing is
asserted. Sizes are small so the file runs in seconds; with ``--benchmark-disable`` (CI) each
benchmarked call runs once, still checked::

    python -m pytest benchmarks/test_bench_suites.py -rA                  # timings table (*)
    python -m pytest tests benchmarks/test_bench_suites.py --benchmark-disable   # CI
    python -m pytest -m cuda benchmarks/test_bench_suites.py -rA          # GPU machine

(*) With pytest 9 and this project's ``addopts = "... -ra"`` pytest-benchmark's table is only
printed when passed tests are reported too (``-rA``).
"""

from __future__ import annotations

import numpy as np
import pytest

from atso_fast import Relabeler
from atso_fast.engine.windows import gaussian_importance, sliding_window_origins
from atso_fast.kernels import native, reference

__all__: list[str] = []

NO_CUDA = f"needs a CUDA GPU and a CUDA build of atso_fast._C (build_info: {native.build_info()})"
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not native.has_cuda(), reason=NO_CUDA)]),
]
VOLUME, PATCH, CHANNELS, BATCH = (40, 56, 48), (16, 16, 16), 3, 8


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2024)


def put(array: np.ndarray, device: str):
    """The array itself on cpu, a CUDA torch tensor on cuda."""
    if device == "cpu":
        return np.ascontiguousarray(array)
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def get(array) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else array.cpu().numpy()


def synced(fn, device: str):
    """``fn`` followed by a device synchronisation, so CUDA timings cover the kernel."""
    if device == "cpu":
        return fn
    import torch

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return run


def origins() -> np.ndarray:
    grid = sliding_window_origins(VOLUME, PATCH, 0.5)
    return np.ascontiguousarray(grid[:: max(len(grid) // BATCH, 1)][:BATCH])


@pytest.mark.parametrize("device", DEVICES)
def test_extract_patches(benchmark, rng, device):
    volume = rng.standard_normal((2, *VOLUME), dtype=np.float32)
    org = origins()
    want = reference.extract_patches(volume, org, PATCH)
    vol_d = put(volume, device)
    np.testing.assert_array_equal(get(native.extract_patches(vol_d, org, PATCH)), want)
    out = put(np.empty_like(want), device)
    benchmark(synced(native.extract_patches, device), vol_d, org, PATCH, out=out)
    np.testing.assert_array_equal(get(out), want)


def accumulate_inputs(rng, z0: int = 8, depth: int = 24):
    acc = np.zeros((CHANNELS, depth, *VOLUME[1:]), np.float32)
    wsum = np.zeros((depth, *VOLUME[1:]), np.float32)
    patches = rng.standard_normal((BATCH, CHANNELS, *PATCH), dtype=np.float32)
    return acc, wsum, patches, origins(), np.ascontiguousarray(gaussian_importance(PATCH)), z0


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate(benchmark, rng, device):
    acc, wsum, patches, org, imp, z0 = accumulate_inputs(rng)
    want_acc, want_wsum = acc.copy(), wsum.copy()
    reference.accumulate(want_acc, want_wsum, patches, org, imp, z0)
    args = [put(a, device) for a in (acc, wsum, patches)]
    imp_d = put(imp, device)
    native.accumulate(args[0], args[1], args[2], org, imp_d, z0)
    # the reference's additions in the reference's order, no FMA: the same bits
    np.testing.assert_array_equal(get(args[0]), want_acc)
    np.testing.assert_array_equal(get(args[1]), want_wsum)
    # In place: each round adds the same windows again (the sums keep growing; only time counts).
    benchmark(synced(native.accumulate, device), args[0], args[1], args[2], org, imp_d, z0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [3, 105])
def test_finalize(benchmark, rng, device, channels):
    acc = rng.standard_normal((channels, 16, *VOLUME[1:]), dtype=np.float32) * 3
    wsum = rng.uniform(0.5, 2.0, acc.shape[1:]).astype(np.float32)
    labels, conf, counts = reference.finalize(acc, wsum, 0.4, 255, "logits")
    acc_d, wsum_d = put(acc, device), put(wsum, device)
    got = synced(native.finalize, device)(acc_d, wsum_d, 0.4, 255, "logits")
    # Our exp polynomial (the same on CPU and CUDA) is within 2 ulp of NumPy's exp: labels may
    # flip only on the threshold or a tie, confidence by one step of the 0..255 scale (as in
    # tests/test_kernels.py).
    assert (get(got.labels) == labels).mean() >= 0.999
    assert np.abs(get(got.confidence).astype(int) - conf.astype(int)).max() <= 1
    assert got.counts.sum() + got.ignored + got.invalid == wsum.size
    assert got.invalid == counts[-1] == 0
    benchmark(synced(native.finalize, device), acc_d, wsum_d, 0.4, 255, "logits")


def sign_net():
    """Known answer: logits ``(x, -x)`` per voxel, so the label is 1 exactly where ``x < 0``."""
    import torch

    conv = torch.nn.Conv3d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1, 1))
    return conv.eval()


@pytest.mark.parametrize("device", DEVICES)
def test_relabel_pass(benchmark, rng, device):
    magnitude = rng.uniform(0.5, 2.0, VOLUME).astype(np.float32)
    volume = np.where(rng.random(VOLUME) < 0.3, -magnitude, magnitude).astype(np.float32)
    expected = (volume < 0).astype(np.uint8)
    rel = Relabeler.from_module(sign_net(), window=PATCH, num_classes=2, overlap=0.5, batch_size=4, device=device)
    first = rel.relabel_volume(volume)
    np.testing.assert_array_equal(first.labels, expected)
    assert first.stats["label_counts"] == [int((expected == 0).sum()), int(expected.sum())]
    # softmax of (x, -x): max probability 1 / (1 + exp(-2|x|)), as uint8 x 255
    conf = np.floor(255 / (1 + np.exp(-2.0 * magnitude)) + 0.5)
    assert np.abs(first.confidence.astype(int) - conf.astype(int)).max() <= 1
    result = benchmark(rel.relabel_volume, volume)
    np.testing.assert_array_equal(result.labels, expected)


def test_bench_kernels_floor_counts_each_batch_once():
    """The DRAM floor of bench_kernels: voxels each batch covers, overlaps within a batch once."""
    import bench_kernels

    groups = [np.array([[0, 0, 0], [0, 0, 2]]), np.array([[-1, -1, -1]])]
    # batch 1: x [0, 4) and [2, 6) -> [0, 5) after clipping, 2 x 2 x 5; batch 2: 1 x 1 x 3 inside
    assert bench_kernels.covered_voxels(groups, (2, 3, 5), (2, 2, 4)) == 20 + 3
