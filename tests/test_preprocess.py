"""Preprocessing spec, resampling in and out, crop/uncrop and orientation, against nnU-Net's own
functions (``default_resampling``, normalisation classes, ``crop_to_nonzero``) and nibabel."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from atso_fast.engine import Relabeler  # noqa: E402
from atso_fast.engine.merger import ArrayBackend, LabelSink  # noqa: E402
from atso_fast.engine.preprocess import (  # noqa: E402
    axis_op,
    new_shape,
    plan_geometry,
    prepare,
    separate_axis,
)
from atso_fast.engine.resample import ResampleSink  # noqa: E402
from atso_fast.package import ModelPackage, PackageError, load_package  # noqa: E402
from atso_fast.package.normalize import normalize  # noqa: E402
from atso_fast.package.spec import check_fields, default_preprocessing  # noqa: E402
from atso_fast.train.data import RawCase, training_spacing  # noqa: E402

try:  # the reference of the nnU-Net comparisons; the other tests (CUDA ones too) run without it
    from nnunetv2.preprocessing.resampling import default_resampling as resampling
except ImportError:
    resampling = None
needs_nnunet = pytest.mark.skipif(resampling is None, reason="needs nnunetv2 (the reference resampling)")

CASES = [  # (scan spacing, model spacing, scan shape (Z, Y, X))
    ((3.0, 3.0, 3.0), (2.0, 1.5, 1.5), (20, 30, 25)),  # upsampling, isotropic: 3D cubic
    ((5.0, 0.6, 0.6), (5.0, 1.5, 1.5), (12, 60, 70)),  # anisotropic scan: separate z, z kept
    ((1.0, 1.0, 1.0), (4.0, 1.2, 1.2), (30, 40, 50)),  # anisotropic model: separate z, z order 0
    ((2.0, 6.5, 0.8), (2.0, 4.0, 1.0), (16, 10, 40)),  # low-resolution axis 1 (not z)
    ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (7, 8, 9)),  # same spacing: nothing to do
]


def package(spacing, *, num_classes=3, window=(8, 8, 8), **spec):
    pre = {**default_preprocessing(), **spec}
    return ModelPackage(
        None, window, 1, num_classes, spacing=None if spacing is None else list(spacing), preprocessing=pre
    )


@pytest.mark.parametrize("order, kind", [(0, "zoom"), (1, "zoom"), (3, "zoom"), (0, "coords"), (1, "coords")])
@pytest.mark.parametrize("n_in, n_out", [(7, 13), (13, 7), (10, 10), (1, 4), (5, 1)])
def test_axis_maps_are_scipys(order, kind, n_in, n_out):
    from scipy import ndimage

    op = axis_op(n_in, n_out, order, kind)
    x = np.random.default_rng(0).normal(size=n_in)
    if kind == "zoom":
        want = ndimage.zoom(x, n_out / n_in, order=order, mode="nearest", grid_mode=True)
    else:
        coords = (n_in / n_out * (np.arange(n_out) + 0.5) - 0.5)[None]
        want = ndimage.map_coordinates(x, coords, order=order, mode="nearest")
    np.testing.assert_allclose(op.matrix @ x, want, atol=1e-12)
    if order <= 1:
        taps = (1 - op.w1) * x[op.idx0] + op.w1 * x[op.idx1]
        np.testing.assert_allclose(taps, want, atol=1e-12)


@needs_nnunet
def test_separate_axis_is_nnunets_rule():
    for current, new in [
        ((3, 1, 1), (1, 1, 1)),
        ((1, 1, 1), (4, 1, 1)),
        ((1, 1, 1), (2, 1, 1)),
        ((1, 4, 4), (1, 1, 1)),
        ((1, 5, 1), (1, 1, 1)),
    ]:
        for force in (None, True, False):
            want_sep, want_axis = resampling.determine_do_sep_z_and_axis(force, current, new, 3)
            assert separate_axis(current, new, force, 3.0) == (want_axis if want_sep else None)


@needs_nnunet
@pytest.mark.parametrize("scan_spacing, model_spacing, shape", CASES)
def test_data_resampling_equals_nnunet(scan_spacing, model_spacing, shape):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(2, *shape)).astype(np.float32)
    vol, geom = prepare(data, package(model_spacing), spacing=scan_spacing, normalized=True)
    want_shape = tuple(int(n) for n in resampling.compute_new_shape(shape, scan_spacing, model_spacing))
    assert geom.target == want_shape == new_shape(shape, scan_spacing, model_spacing)
    want = resampling.resample_data_or_seg_to_shape(data, want_shape, scan_spacing, model_spacing, False, 3, 0, None)
    assert vol.shape == want.shape and vol.dtype == np.float32 and vol.flags.c_contiguous
    np.testing.assert_allclose(vol, want, atol=2e-5, rtol=0)


def feed(sink, acc, wsum, rng, max_rows=5):
    """Target rows to ``sink`` in random runs, through a slab that the merger would reuse."""
    z = 0
    while z < acc.shape[1]:
        count = min(int(rng.integers(1, max_rows + 1)), acc.shape[1] - z)
        slab = np.full((acc.shape[0], count + 3, *acc.shape[2:]), np.nan, np.float32)
        ws = np.full((count + 3, *acc.shape[2:]), np.nan, np.float32)
        slab[:, :count], ws[:count] = acc[:, z : z + count], wsum[z : z + count]
        sink.take(slab, ws, z, count)
        assert len(sink._rows) <= 1  # at most one target row outlives a call
        z += count


@needs_nnunet
@pytest.mark.parametrize("scan_spacing, model_spacing, shape", CASES[:4])
def test_resample_sink_streams_what_nnunet_resamples_whole(scan_spacing, model_spacing, shape):
    rng = np.random.default_rng(2)
    pkg = package(model_spacing, num_classes=4)
    geom = plan_geometry(np.zeros((1, *shape), np.float32), pkg, scan_spacing, None)
    logits = (rng.normal(size=(4, *geom.target)) * 3).astype(np.float32)
    wsum = rng.uniform(0.5, 2.0, size=geom.target).astype(np.float32)
    inner = LabelSink(
        geom.cropped,
        4,
        kind="logits",
        threshold=0.0,
        ignore_index=255,
        backend=ArrayBackend("cpu"),
        save_probabilities=True,
    )
    sink = ResampleSink(inner, geom.back)
    feed(sink, logits * wsum[None], wsum, rng)
    assert sink.finalize() is inner
    want = resampling.resample_data_or_seg_to_shape(
        logits, geom.cropped, geom.target_spacing, scan_spacing, False, 1, 0, None
    )
    probs = torch.softmax(torch.from_numpy(np.asarray(want, np.float32)), 0).numpy()
    np.testing.assert_allclose(inner.probabilities, probs, atol=1e-5)
    np.testing.assert_array_equal(inner.labels, want.argmax(0))
    assert inner.totals.counts.sum() == np.prod(geom.cropped)


class Pointwise(torch.nn.Module):
    """Logits ``(-x, x)``: the blended output is the network input itself, whatever the grid."""

    def forward(self, x):
        return torch.cat([-x, x], dim=1)


@needs_nnunet
@pytest.mark.parametrize("scan_spacing, model_spacing, shape", CASES[:4])
@pytest.mark.parametrize("grid", ["monai", "nnunet"])
def test_known_answer_through_the_whole_chain(scan_spacing, model_spacing, shape, grid):
    """probabilities = softmax(resample_back(resample_in(x))), computed by nnU-Net's functions."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=shape).astype(np.float32)
    pkg = package(model_spacing, num_classes=2, window=(6, 8, 8), grid=grid)
    rel = Relabeler(None, _package=pkg, _module=Pointwise(), runtime="torch", save_probabilities=True)
    result = rel.relabel_volume(x, spacing=scan_spacing)
    target = tuple(int(n) for n in resampling.compute_new_shape(shape, scan_spacing, model_spacing))
    inside = resampling.resample_data_or_seg_to_shape(x[None], target, scan_spacing, model_spacing, False, 3, 0, None)
    logits = np.concatenate([-inside, inside])
    back = resampling.resample_data_or_seg_to_shape(logits, shape, model_spacing, scan_spacing, False, 1, 0, None)
    probs = torch.softmax(torch.from_numpy(np.asarray(back, np.float32)), 0).numpy()
    np.testing.assert_allclose(result.probabilities, probs, atol=2e-5)
    assert result.labels.shape == shape and result.stats["network_shape"] == list(target)
    assert set(result.stats["timings"]) == {"preprocess", "network", "stitch", "export"}
    assert result.stats["spacing"] == list(scan_spacing)


def test_crop_to_nonzero_and_background_outside(rng):
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    x = np.zeros((12, 20, 18), np.float32)
    x[3:9, 5:15, 2:11] = rng.normal(size=(6, 10, 9)) + 5
    x[5, 8, 6] = 0  # a hole: filled in the mask, kept inside the box
    pkg = package(None, num_classes=2, window=(4, 8, 8), crop_to_nonzero=True)
    pkg.normalization = {"scheme": "zscore", "use_mask": True}
    vol, geom = prepare(x[None], pkg)
    data, seg, bbox = crop_to_nonzero(x[None].copy())
    assert [[s.start, s.stop] for s in geom.bbox] == [list(b) for b in bbox]
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        ZScoreNormalization,
    )

    want = ZScoreNormalization(use_mask_for_norm=True, intensityproperties={}).run(data[0].copy(), seg[0])
    np.testing.assert_allclose(vol[0], want, atol=1e-5)
    rel = Relabeler(None, _package=pkg, _module=Pointwise(), runtime="torch", save_probabilities=True)
    result = rel.relabel_volume(x)
    outside = np.ones(x.shape, bool)
    outside[geom.bbox] = False
    assert (result.labels[outside] == 0).all() and (result.confidence[outside] == 255).all()
    assert (result.probabilities[0][outside] == 1).all() and (result.probabilities[1][outside] == 0).all()
    assert result.stats["label_counts"][0] >= outside.sum()
    assert sum(result.stats["label_counts"]) == x.size


def test_ct_normalisation_equals_nnunet(rng):
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
        CTNormalization,
    )

    x = rng.normal(0, 400, size=(5, 6, 7)).astype(np.float32)
    props = {"mean": 40.0, "std": 120.0, "percentile_00_5": -150.0, "percentile_99_5": 300.0}
    want = CTNormalization(intensityproperties=props).run(x.copy())
    got = normalize(x, {"scheme": "ct", "clip": [-150.0, 300.0], "mean": 40.0, "std": 120.0})
    np.testing.assert_allclose(got, want, rtol=1e-6)
    two = normalize(np.stack([x, x]), [{"scheme": "none"}, {"scheme": "rgb_to_0_1"}])
    np.testing.assert_allclose(two[1], x / 255, rtol=1e-6)


def test_ras_orientation_is_nibabels_canonical(rng):
    nib = pytest.importorskip("nibabel")
    data_xyz = rng.normal(size=(5, 6, 7)).astype(np.float32)
    affine = np.array([[0, 0, -2.0, 10], [-0.8, 0, 0, 5], [0, 1.5, 0, -3], [0, 0, 0, 1]])
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data_xyz, affine))
    pkg = package(None, num_classes=2, orientation="RAS")
    vol, geom = prepare(np.ascontiguousarray(data_xyz.T)[None], pkg, spacing=(2.0, 1.5, 0.8), affine=affine)
    np.testing.assert_array_equal(vol[0], np.asarray(canonical.dataobj).T)
    np.testing.assert_allclose(geom.spacing, canonical.header.get_zooms()[::-1])
    native = np.arange(5 * 6 * 7).reshape(7, 6, 5)
    np.testing.assert_array_equal(geom.to_native(np.ascontiguousarray(geom.to_net(native))), native)
    with pytest.warns(RuntimeWarning, match="no affine"):
        Relabeler(None, _package=pkg, _module=Pointwise(), runtime="torch").relabel_volume(data_xyz.T.copy())


def test_spec_validation_names_the_field():
    ok = check_fields({"spacing": [2, 1.5, 1.5], "mirror_axes": [2, 0]}, 3, 3, "m.json")
    assert ok["spacing"] == [2.0, 1.5, 1.5] and ok["mirror_axes"] == [0, 2]
    assert ok["preprocessing"] == default_preprocessing()
    for bad, words in [
        ({"spacing": [1, 2]}, "spacing"),
        ({"spacing": [1, -2, 3]}, "spacing"),
        ({"preprocessing": {"orientation": "LPS"}}, "orientation"),
        ({"preprocessing": {"grid": "x"}}, "grid"),
        ({"preprocessing": {"transpose": [0, 0, 1]}}, "transpose"),
        ({"preprocessing": {"resampling": {"probabilities_order": 3}}}, "0 or 1"),
        ({"preprocessing": {"bogus": 1}}, "keys"),
        ({"mirror_axes": [3]}, "mirror_axes"),
        ({"class_names": ["a"]}, "class_names"),
    ]:
        with pytest.raises(ValueError, match=words):
            check_fields(bad, 3, 3, "m.json")


def test_export_records_the_spec(tmp_path):
    from atso_fast.package import export_model

    net = torch.nn.Conv3d(1, 3, 1)
    out = export_model(
        net,
        tmp_path / "pkg",
        window=(4, 8, 8),
        num_classes=3,
        spacing=[2.0, 0.8, 0.8],
        orientation="RAS",
        class_names=["bg", "liver", "spleen"],
        save_torch=False,
        preprocessing={"crop_to_nonzero": True, "grid": "nnunet"},
    )
    pkg = load_package(out)
    assert pkg.spacing == [2.0, 0.8, 0.8] and pkg.class_names == ["bg", "liver", "spleen"]
    assert pkg.preprocessing["orientation"] == "RAS" and pkg.preprocessing["grid"] == "nnunet"
    assert pkg.preprocessing["crop_to_nonzero"] is True
    with pytest.raises(PackageError, match="orientation"):
        export_model(net, tmp_path / "bad", window=(4, 8, 8), num_classes=3, orientation="LPI", save_torch=False)


def test_packages_without_spacing_warn_once_on_mixed_spacings():
    pkg = package(None, num_classes=2, window=(4, 8, 8))
    rel = Relabeler(None, _package=pkg, _module=Pointwise(), runtime="torch")
    x = np.zeros((6, 10, 10), np.float32)
    rel.relabel_volume(x, spacing=(2.0, 1.0, 1.0))
    rel.relabel_volume(x, spacing=(2.1, 1.05, 1.0))  # within 20%
    with pytest.warns(RuntimeWarning, match="differ by more than 20%"):
        rel.relabel_volume(x, spacing=(5.0, 1.0, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rel.relabel_volume(x, spacing=(5.0, 1.0, 1.0))  # once only
    with pytest.raises(ValueError, match="spacing"):
        rel.relabel_volume(x, spacing=(0, 1, 1))


def test_training_spacing():
    img = np.zeros((1, 2, 2, 2))
    assert training_spacing([RawCase(img, spacing=(2, 1, 1)), RawCase(img, spacing=(2.2, 1, 1))]) == [2.1, 1, 1]
    assert training_spacing([RawCase(img, spacing=(2, 1, 1)), RawCase(img, spacing=(5, 1, 1))]) is None
    assert training_spacing([RawCase(img), RawCase(img, spacing=(2, 1, 1))]) is None


@pytest.mark.cuda
@pytest.mark.parametrize("scan_spacing, model_spacing, shape", CASES[:3])
def test_cuda_resampling_matches_cpu(scan_spacing, model_spacing, shape):
    """Resampling in and out on CUDA tensors gives the CPU result (float32 rounding apart)."""
    x = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    pkg = package(model_spacing, num_classes=2, window=(6, 8, 8), grid="nnunet")
    out = {
        dev: Relabeler(
            None, _package=pkg, _module=Pointwise(), runtime="torch", device=dev, save_probabilities=True
        ).relabel_volume(x, spacing=scan_spacing)
        for dev in ("cpu", "cuda")
    }
    np.testing.assert_allclose(out["cuda"].probabilities, out["cpu"].probabilities, atol=1e-5)
    assert (out["cuda"].labels == out["cpu"].labels).mean() > 0.9999
