"""A package with a spacing over an archive of mixed formats: every output on its input's grid,
in its input's format, with the spacing read from each file and recorded in the manifest."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sitk = pytest.importorskip("SimpleITK")

from test_io_formats import write_dicom_series  # noqa: E402

from atso_fast.cli import main as cli_main  # noqa: E402
from atso_fast.engine import Relabeler  # noqa: E402
from atso_fast.io import Manifest, read_volume  # noqa: E402
from atso_fast.package import export_model  # noqa: E402


class Threshold(torch.nn.Module):
    """Two logits (0, x): class 1 where the normalised input is positive."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), x], dim=1)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return export_model(
        Threshold(),
        tmp_path_factory.mktemp("pkg") / "pkg",
        window=(8, 16, 16),
        num_classes=2,
        spacing=[2.0, 1.2, 1.2],
        class_names=["background", "bright"],
        save_torch=False,
        normalization={"scheme": "ct", "clip": [-200.0, 200.0], "mean": 0.0, "std": 100.0},
    )


def _image(rng, shape, spacing, origin=(0.0, 0.0, 0.0)):
    array = (rng.normal(0, 60, size=shape) + np.linspace(-150, 150, shape[2])[None, None]).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return array, image


def test_mixed_format_archive_on_native_grids(package, tmp_path, rng):
    archive = tmp_path / "archive"
    archive.mkdir()
    scans = {}
    for name, suffix, spacing in (
        ("a", ".nii.gz", (0.8, 0.8, 3.0)),
        ("b", ".nrrd", (1.5, 1.5, 1.0)),
        ("c", ".mha", (0.6, 0.9, 2.5)),
    ):
        array, image = _image(rng, (10, 30, 36), spacing, (5.0, -3.0, 12.0))
        sitk.WriteImage(image, str(archive / f"{name}{suffix}"))
        scans[name] = (suffix, image)
    dicom, _ = _image(rng, (6, 24, 20), (0.75, 0.75, 3.0))
    write_dicom_series(archive / "d", dicom, spacing=(0.75, 0.75, 3.0))
    out = tmp_path / "out"
    assert cli_main(["relabel", str(package), str(archive), str(out), "--quiet", "--save-confidence"]) == 0
    rows = {r["case_id"]: r for r in Manifest(out / "manifest.jsonl").rows()}
    assert sorted(rows) == ["a", "b", "c", "d"] and all(r["status"] == "ok" for r in rows.values())
    for name, (suffix, image) in scans.items():
        written = sitk.ReadImage(str(out / f"{name}{suffix}"))
        assert written.GetSize() == image.GetSize()
        np.testing.assert_allclose(written.GetSpacing(), image.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-4)
        assert (out / f"{name}_confidence{suffix}").is_file()
        np.testing.assert_allclose(rows[name]["spacing"], image.GetSpacing()[::-1], rtol=1e-6)
        assert set(rows[name]["timings"]) == {"preprocess", "network", "stitch", "export"}
    labels, meta = read_volume(out / "d.nii.gz")
    assert labels.shape == dicom.shape and meta.spacing == pytest.approx((3.0, 0.75, 0.75))
    assert rows["d"]["spacing"] == pytest.approx([3.0, 0.75, 0.75])


def test_labels_follow_the_intensity_on_the_native_grid(package, rng):
    """The threshold model labels what is bright; resampled to 1.2 mm and back, the labels stay
    where the scan is bright (a sanity check independent of nnU-Net)."""
    array = np.full((12, 40, 40), -300, np.int16)
    array[:, 10:30, 5:35] = 300
    result = Relabeler(package, runtime="onnxruntime").relabel_volume(array, spacing=(3.0, 0.6, 0.6))
    assert result.stats["network_shape"] == [18, 20, 20]
    assert (result.labels[:, 12:28, 7:33] == 1).all() and (result.labels[:, :8] == 0).all()
