"""The nnU-Net importer on bad or unsupported model folders: clear refusals, no code run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("dynamic_network_architectures")

from atso_fast.cli import main as cli_main  # noqa: E402
from atso_fast.datasets.nnunet_folder import make_nnunet_folder  # noqa: E402
from atso_fast.package import PackageError, load_package  # noqa: E402
from atso_fast.package.nnunet import import_nnunet, load_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def folder2d(tmp_path_factory) -> Path:
    return make_nnunet_folder(
        tmp_path_factory.mktemp("nn") / "results",
        configuration="2d",
        patch=(32, 32),
        spacing=(1.0, 1.0),
        folds=(0,),
        normalization="ZScoreNormalization",
        features=(4, 8),
        mirror_axes=None,
    )


def edited_copy(src: Path, dst: Path, *, dataset=None, plans=None) -> Path:
    import shutil

    shutil.copytree(src, dst)
    for name, edit in (("dataset.json", dataset), ("plans.json", plans)):
        if edit is not None:
            data = json.loads((dst / name).read_text())
            edit(data)
            (dst / name).write_text(json.dumps(data))
    return dst


def test_region_based_models_are_refused(folder2d, tmp_path):
    def regions(d):
        d["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
        d["regions_class_order"] = [1, 2]

    bad = edited_copy(folder2d, tmp_path / "m", dataset=regions)
    with pytest.raises(PackageError, match="region-based"):
        import_nnunet(bad, tmp_path / "out")


def test_cascades_are_refused(folder2d, tmp_path):
    def cascade(p):
        p["configurations"]["2d"]["previous_stage"] = "3d_lowres"

    bad = edited_copy(folder2d, tmp_path / "m", plans=cascade)
    with pytest.raises(PackageError, match="cascade"):
        import_nnunet(bad, tmp_path / "out")


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("network_class_name", "os.system", "not one the importer builds"),
        ("nonlin", "builtins.eval", "not one the importer builds"),
    ],
)
def test_class_names_outside_the_allow_list_are_refused(folder2d, tmp_path, key, value, words):
    def evil(p):
        arch = p["configurations"]["2d"]["architecture"]
        if key == "network_class_name":
            arch[key] = value
        else:
            arch["arch_kwargs"][key] = value

    bad = edited_copy(folder2d, tmp_path / "m", plans=evil)
    with pytest.raises(PackageError, match=words):
        import_nnunet(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class Payload:
    """Unpickling this would call a class from this module: weights_only loading must refuse."""

    def __reduce__(self):
        return (Path, ("/should/never/be/built",))


def test_checkpoints_never_run_code(folder2d, tmp_path):
    bad = edited_copy(folder2d, tmp_path / "m")
    ckpt = torch.load(bad / "fold_0" / "checkpoint_final.pth", weights_only=False)
    ckpt["logging"]["extra"] = Payload()
    torch.save(ckpt, bad / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(PackageError, match="does not unpickle"):
        load_checkpoint(bad / "fold_0" / "checkpoint_final.pth")
    (bad / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PackageError, match="not a readable torch checkpoint"):
        import_nnunet(bad, tmp_path / "out")


def test_missing_pieces_are_named(folder2d, tmp_path):
    with pytest.raises(PackageError, match="not a directory"):
        import_nnunet(tmp_path / "nope", tmp_path / "out")
    bad = edited_copy(folder2d, tmp_path / "m")
    with pytest.raises(PackageError, match="fold_3"):
        import_nnunet(bad, tmp_path / "out", folds=[3])
    with pytest.raises(PackageError, match="no fold_K/other.pth"):
        import_nnunet(bad, tmp_path / "out", checkpoint="other.pth")
    (bad / "plans.json").unlink()
    with pytest.raises(PackageError, match="plans.json: not found"):
        import_nnunet(bad, tmp_path / "out")


def test_wrong_weights_are_reported(folder2d, tmp_path):
    def wider(p):
        p["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"] = [6, 8]

    bad = edited_copy(folder2d, tmp_path / "m", plans=wider)
    with pytest.raises(PackageError, match="weights do not fit"):
        import_nnunet(bad, tmp_path / "out")


def test_cli_import_nnunet(folder2d, tmp_path, capsys):
    assert cli_main(["import-nnunet", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "not an nnU-Net model folder" in capsys.readouterr().err
    assert cli_main(["import-nnunet", str(folder2d), str(tmp_path / "pkg"), "--folds", "0", "--quiet"]) == 0
    pkg = load_package(tmp_path / "pkg")
    assert pkg.window == (32, 32) and pkg.mirror_axes == []  # no allowed axes stored: nnU-Net mirrors nothing
    assert pkg.preprocessing["grid"] == "nnunet" and pkg.preprocessing["crop_to_nonzero"] is True
