"""nnU-Net v2 model folders: ``atso_fast.import_nnunet`` side by side with ``nnUNetPredictor``.

Model folders are built on the fly (``atso_fast.datasets.nnunet_folder``: nnU-Net's own
PlainConvUNet, random weights, last layer scaled so logits are well separated); nnU-Net's predictor
(CPU, its sequential path: the same preprocessing, sliding window and export functions as
``nnUNetv2_predict``) and atso-fast relabel real scans from ``shared/data/real``; labels must agree
on >= 99.9% of voxels with the same shape and affine. nnU-Net accumulates window outputs in
float16; probabilities are compared (within 1e-3) with its predictor run with float32 accumulators
(``torch.half`` patched for that run) and our torch runtime (the package's ``torch.export``
program: the same kernels as nnU-Net's eager network), which isolates the pipeline's arithmetic
from nnU-Net's float16 rounding and from ONNX Runtime's own float32 rounding (about 2e-4 of the
logits' scale on these networks; the labels tests run ONNX Runtime).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nnunetv2")
pytest.importorskip("SimpleITK")

from atso_fast import import_nnunet  # noqa: E402
from atso_fast.datasets.nnunet_folder import make_nnunet_folder  # noqa: E402
from atso_fast.engine import Relabeler  # noqa: E402
from atso_fast.io import read_volume, write_labels  # noqa: E402
from atso_fast.package import load_package  # noqa: E402
from atso_fast.runtimes.openvino_rt import openvino_available  # noqa: E402

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

THREADS = 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two nnU-Net folders and their imported packages: a 2-fold 3d_fullres with anisotropic
    target spacing (CT normalisation) and a 2d ZScore model with use_mask_for_norm."""
    root = tmp_path_factory.mktemp("nnunet")
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        f3 = make_nnunet_folder(
            root / "results3d",
            configuration="3d_fullres",
            patch=(32, 64, 64),
            spacing=(10.0, 3.0, 3.0),
            folds=(0, 1),
            features=(4, 8, 16, 32),
            scale=8.0,
            seed=1,
        )
        f2 = make_nnunet_folder(
            root / "results2d",
            configuration="2d",
            patch=(64, 64),
            spacing=(2.5, 2.5),
            folds=(0,),
            normalization="ZScoreNormalization",
            use_mask=True,
            features=(8, 16, 32),
            scale=8.0,
            seed=2,
            mirror_axes=(0, 1),
        )
        p3, p2 = import_nnunet(f3, root / "pkg3d"), import_nnunet(f2, root / "pkg2d")
    finally:
        torch.set_num_threads(before)
    return {"3d": (f3, p3), "2d": (f2, p2), "root": root}


def run_nnunet(
    folder: Path,
    image: Path,
    out: Path,
    *,
    mirror: bool,
    probabilities: bool = False,
    fp32: bool = False,
    monkeypatch=None,
) -> Path:
    """nnUNetPredictor on one scan (CPU); returns the label file. ``fp32``: float32 accumulators."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=mirror,
        device=torch.device("cpu"),
        verbose=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=None)
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        if fp32:
            monkeypatch.setattr(torch, "half", torch.float32)
        predictor.predict_from_files_sequential(
            [[str(image)]], [str(out)], save_probabilities=probabilities, overwrite=True
        )
    finally:
        if fp32:
            monkeypatch.undo()
        torch.set_num_threads(before)
    return out.with_name(out.name + ".nii.gz")


def run_ours(
    package: Path, image: Path, out: Path, *, mirror: bool, probabilities: bool = False, runtime: str = "onnxruntime"
):
    relabeler = Relabeler(package, runtime=runtime, mirror=mirror, save_probabilities=probabilities, threads=THREADS)
    array, meta = read_volume(image)
    result = relabeler.relabel_volume(array, spacing=meta.spacing, affine=meta.affine)
    write_labels(out, result.labels, meta)
    return result, out


def compare_labels(ours: Path, theirs: Path) -> float:
    a, meta_a = read_volume(ours)
    b, meta_b = read_volume(theirs)
    assert a.shape == b.shape
    np.testing.assert_allclose(meta_a.affine, meta_b.affine, atol=1e-4)
    np.testing.assert_allclose(meta_a.spacing, meta_b.spacing, rtol=1e-6)
    return float((a == b).mean())


@pytest.mark.parametrize(
    "case, mirror",
    [
        ("ct_abdomen", False),  # CT, isotropic 3 mm scan -> anisotropic grid (separate z)
        ("tumour_breast1", True),  # anisotropic scan smaller than the patch (padding), mirroring
        ("brain_mni152", False),  # zero background: crop to the nonzero box, background outside
    ],
)
def test_3d_two_folds_labels_match_nnunet_predictor(models, real_data, tmp_path, case, mirror, monkeypatch):
    folder, package = models["3d"]
    image = real_data / case / "image.nii.gz"
    theirs = run_nnunet(folder, image, tmp_path / "nnunet", mirror=mirror)
    result, ours = run_ours(package, image, tmp_path / "ours.nii.gz", mirror=mirror)
    agree = compare_labels(ours, theirs)
    print(
        f"{case} mirror={mirror}: labels agree on {agree:.5%} of {result.labels.size} voxels; "
        f"network grid {result.stats['network_shape']}"
    )
    assert agree >= 0.999
    if case == "ct_abdomen":  # what is left is nnU-Net's float16 accumulation: without it, ~identical
        exact = run_nnunet(folder, image, tmp_path / "nnunet32", mirror=mirror, fp32=True, monkeypatch=monkeypatch)
        agree32 = compare_labels(ours, exact)
        print(
            f"{case}: vs nnU-Net with float32 accumulators {agree32:.5%}; nnU-Net float16 vs float32 "
            f"{compare_labels(theirs, exact):.5%}"
        )
        assert agree32 >= 0.9999
    assert len(np.unique(result.labels)) >= 2  # the scaled model is not trivially constant


def test_2d_zscore_labels_match_nnunet_predictor(models, real_data, tmp_path):
    folder, package = models["2d"]
    image = real_data / "tumour_brain1" / "image.nii.gz"
    theirs = run_nnunet(folder, image, tmp_path / "nnunet", mirror=True)
    result, ours = run_ours(package, image, tmp_path / "ours.nii.gz", mirror=True)
    agree = compare_labels(ours, theirs)
    print(f"2d tumour_brain1: labels agree on {agree:.5%} of {result.labels.size} voxels")
    assert agree >= 0.999
    assert len(np.unique(result.labels)) == 3


def test_probabilities_match_nnunet_with_float32_accumulators(models, real_data, tmp_path, monkeypatch):
    folder, package = models["3d"]
    image = real_data / "tumour_breast1" / "image.nii.gz"
    theirs = run_nnunet(
        folder, image, tmp_path / "nnunet", mirror=False, probabilities=True, fp32=True, monkeypatch=monkeypatch
    )
    result, ours = run_ours(package, image, tmp_path / "ours.nii.gz", mirror=False, probabilities=True, runtime="torch")
    want = np.load(tmp_path / "nnunet.npz")["probabilities"]
    assert want.shape == result.probabilities.shape
    diff = float(np.abs(want - result.probabilities).max())
    print(f"probabilities: max |ours - nnU-Net fp32| = {diff:.2e}")
    assert diff <= 1e-3
    assert compare_labels(ours, theirs) >= 0.9999


def test_model_json_carries_the_plans(models):
    folder, package = models["3d"]
    meta = json.loads((package / "model.json").read_text())
    plans = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]
    assert meta["window"] == plans["patch_size"] and meta["spacing"] == plans["spacing"]
    assert meta["class_names"] == ["background", "class_1", "class_2"]
    assert meta["mirror_axes"] == [0, 1, 2]
    assert meta["normalization"] == [{"scheme": "ct", "clip": [-150.0, 300.0], "mean": 40.0, "std": 120.0}]
    assert meta["preprocessing"] == {
        "orientation": "as-stored",
        "transpose": None,
        "crop_to_nonzero": True,
        "resampling": {
            "data_order": 3,
            "data_order_z": 0,
            "probabilities_order": 1,
            "probabilities_order_z": 0,
            "separate_z": None,
            "anisotropy_threshold": 3.0,
        },
        "grid": "nnunet",
    }
    assert meta["source"]["folds"] == ["0", "1"] and meta["source"]["kind"] == "nnunetv2"
    pkg2 = load_package(models["2d"][1])
    assert pkg2.window == (64, 64) and pkg2.spacing == [2.5, 2.5] and pkg2.mirror_axes == [0, 1]
    assert pkg2.normalization == [{"scheme": "zscore", "use_mask": True}]


def test_auto_runs_an_imported_package_on_openvino_with_its_norms_rewritten(models):
    """Without a measured record an imported package follows the CPU rule: OpenVINO when
    installed, whose instance norms are rewritten (they were less exact than ONNX Runtime's)."""
    package = load_package(models["3d"][1])
    assert package.reference == "nnunetv2"
    relabeler = Relabeler(models["3d"][1], threads=1)
    if not openvino_available():
        assert relabeler.runtime_name == "onnxruntime"
        return
    assert relabeler.runtime_name == "openvino" and relabeler.runtime.precise_norms


def test_relabelling_an_imported_package_never_imports_nnunet(models, tmp_path):
    _, package = models["2d"]
    code = (
        "import sys, numpy as np\n"
        "from atso_fast.engine import Relabeler\n"
        f"r = Relabeler({str(package)!r}, runtime='onnxruntime', threads=1)\n"
        "r.relabel_volume(np.random.default_rng(0).normal(size=(2, 70, 70)).astype('float32'), spacing=(3, 1, 1))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('nnunetv2', 'dynamic_network_architectures')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_transposed_plans_match_nnunet_predictor(tmp_path, real_data):
    """``transpose_forward`` (the network sees the axes in another order; spacing and patch are
    in that order): nnU-Net transposes, crops, normalises and resamples, then undoes it all."""
    folder = make_nnunet_folder(
        tmp_path / "results",
        configuration="3d_fullres",
        patch=(32, 16, 32),
        spacing=(3.0, 10.0, 3.0),
        folds=(0,),
        features=(4, 8, 16),
        scale=8.0,
        seed=3,
        transpose=(2, 0, 1),
    )
    package = import_nnunet(folder, tmp_path / "pkg")
    assert load_package(package).preprocessing["transpose"] == [2, 0, 1]
    image = real_data / "tumour_breast1" / "image.nii.gz"
    theirs = run_nnunet(folder, image, tmp_path / "nnunet", mirror=False)
    result, ours = run_ours(package, image, tmp_path / "ours.nii.gz", mirror=False)
    agree = compare_labels(ours, theirs)
    print(f"transposed plans: labels agree on {agree:.5%}; network grid {result.stats['network_shape']}")
    assert agree >= 0.999


def test_a_folder_from_given_plans_keeps_them(tmp_path):
    """make_nnunet_folder(plans=...): the planner's plans are written as they are (network, patch,
    spacing, normalisation), and the folder imports."""
    plans = json.loads(
        (make_nnunet_folder(tmp_path / "a", patch=(16, 32, 32), features=(4, 8, 16)) / "plans.json").read_text()
    )
    config = plans["configurations"]["3d_fullres"]
    config["spacing"] = [3.0, 1.25, 1.25]
    config["normalization_schemes"] = ["ZScoreNormalization"]
    config["architecture"]["arch_kwargs"]["features_per_stage"] = [6, 12, 24]
    folder = make_nnunet_folder(tmp_path / "b", plans=plans, num_classes=2)
    assert json.loads((folder / "plans.json").read_text()) == plans
    assert json.loads((folder / "dataset.json").read_text())["channel_names"] == {"0": "MR"}
    package = load_package(import_nnunet(folder, tmp_path / "pkg"))
    assert package.spacing == [3.0, 1.25, 1.25] and package.num_classes == 2
