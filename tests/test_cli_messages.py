"""Command-line messages a new user meets (issue 26): options are spelt out, option errors are
named as such, nnU-Net's --save_probabilities works, aliases agree across commands."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_archive import make_case

from atso_fast import export_model
from atso_fast.cli import main
from atso_fast.engine import Relabeler
from atso_fast.io import read_volume


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch.manual_seed(0)
    return export_model(
        torch.nn.Conv3d(1, 3, 3, padding=1),
        tmp_path_factory.mktemp("pkg"),
        window=(4, 8, 8),
        num_classes=3,
        normalization={"scheme": "zscore"},
    )


@pytest.fixture
def archive(tmp_path):
    make_case(tmp_path / "in" / "a.nii.gz", 0)
    return tmp_path / "in"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["-d", "901"], "unrecognized arguments: -d"),
        (["--thresh", "0.5"], "unrecognized arguments: --thresh"),
        (["--threshold", "1.5"], "--threshold is a probability in [0, 1], got 1.5"),
        (["--ignore-index", "70000"], "--ignore-index must be in [0, 65535]"),
    ],
)
def test_option_errors_are_named_as_such(package, archive, tmp_path, capsys, flags, message):
    assert main(["relabel", str(package), str(archive), str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "cannot load model package" not in err


def test_device_cuda_without_a_gpu_says_so(package, archive, tmp_path, capsys):
    from atso_fast.kernels import native

    if native.has_cuda():
        pytest.skip("this machine has a CUDA GPU")
    assert main(["relabel", str(package), str(archive), str(tmp_path / "out"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda needs an NVIDIA GPU" in err and "cannot load model package" not in err


def test_save_probabilities_writes_nnunets_npz(package, archive, tmp_path):
    out = tmp_path / "out"
    assert (
        main(
            [
                "relabel",
                "-m",
                str(package),
                "-i",
                str(archive),
                "--out",
                str(out),
                "--save_probabilities",
                "--batch",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    with np.load(out / "a_probabilities.npz") as data:
        probabilities = data["probabilities"]
    image, meta = read_volume(archive / "a.nii.gz")
    want = (
        Relabeler(package, save_probabilities=True)
        .relabel_volume(image, spacing=meta.spacing, affine=meta.affine)
        .probabilities
    )
    assert probabilities.shape == (3, *meta.spatial_shape) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, want, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-4)
    labels, _ = read_volume(out / "a.nii.gz")
    np.testing.assert_array_equal(labels, probabilities.argmax(0))


def test_export_a_monai_state_dict_from_the_command_line(tmp_path, capsys):
    monai_nets = pytest.importorskip("monai.networks.nets")
    kwargs = {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [4, 8],
        "strides": [2],
        "num_res_units": 1,
    }
    torch.manual_seed(0)
    net = monai_nets.UNet(**kwargs).eval()
    torch.save(net.state_dict(), tmp_path / "unet.pt")
    import json

    argv = [
        "export",
        str(tmp_path / "unet.pt"),
        str(tmp_path / "pkg"),
        "--window",
        "8",
        "16",
        "16",
        "--classes",
        "2",
        "--network",
        "monai.networks.nets:UNet",
        "--network-kwargs",
        json.dumps(kwargs),
        "--class-names",
        "background",
        "tumour",
    ]
    assert main(argv) == 0
    relabeler = Relabeler(tmp_path / "pkg", runtime="onnxruntime")
    volume = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(volume)[None, None]).argmax(1)[0].numpy()
    np.testing.assert_array_equal(relabeler.relabel_volume(volume).labels, want)
    assert relabeler.package.class_names == ["background", "tumour"]
    assert (
        main(["export", str(tmp_path / "unet.pt"), str(tmp_path / "p2"), "--window", "8", "16", "16", "--classes", "2"])
        == 2
    )
    assert "needs --network MODULE:CLASS" in capsys.readouterr().err


def test_overlay_pictures_on_request(package, archive, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    assert main(["relabel", str(package), str(archive), str(out), "--overlay", "--quiet"]) == 0
    with Image.open(out / "a_overlay.png") as picture:
        assert picture.format == "PNG" and picture.size[1] == 256 and picture.mode == "RGB"
    assert main(["relabel", str(package), str(archive), str(tmp_path / "plain"), "--quiet"]) == 0
    assert not list((tmp_path / "plain").glob("*.png"))


def test_overlay_blends_the_labels_where_they_are():
    import io

    from PIL import Image

    from atso_fast.io.overlay import overlay_png

    image = np.zeros((10, 20, 30), np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[4:6, 8:12, 10:20] = 1
    picture = np.asarray(Image.open(io.BytesIO(overlay_png(image, labels))))
    coloured = np.abs(picture[..., 0].astype(int) - picture[..., 2].astype(int)) > 0
    assert coloured.any() and coloured.mean() < 0.5  # some pixels tinted, most grey


def test_relabel_file_writes_labels_on_the_scans_grid(package, archive, tmp_path):
    import nibabel as nib

    relabeler = Relabeler(package)
    result = relabeler.relabel_file(archive / "a.nii.gz", tmp_path / "seg.nii.gz", confidence=tmp_path / "c.nii.gz")
    written = nib.load(tmp_path / "seg.nii.gz")
    source = nib.load(archive / "a.nii.gz")
    np.testing.assert_allclose(written.affine, source.affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj).T, result.labels)
    assert written.get_data_dtype() == np.uint8 and (tmp_path / "c.nii.gz").is_file()


def test_one_relabeler_option_check_for_every_caller():
    from atso_fast.engine.relabeler import relabeler_options

    assert relabeler_options({"overlap": 0.25, "workers": 2}, ignore=("workers",)) == {"overlap": 0.25}
    with pytest.raises(TypeError, match=r"unknown Relabeler option\(s\) \['overlapp'\]"):
        relabeler_options({"overlapp": 0.25})
