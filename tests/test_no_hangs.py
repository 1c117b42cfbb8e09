"""Nothing a user hands over hangs a command (issue 26): FIFOs, devices and sockets among a
model folder's or a training set's files are refused by name without being opened."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_archive import make_case
from test_archive_hardening import no_hang

from atso_fast.io import InputError
from atso_fast.package.errors import PackageError
from atso_fast.train.data import load_raw

pytest.importorskip("nnunetv2")


@pytest.fixture(scope="module")
def nnunet_folder(tmp_path_factory):
    from atso_fast.datasets.nnunet_folder import make_nnunet_folder

    return make_nnunet_folder(
        tmp_path_factory.mktemp("nn") / "results",
        configuration="3d_fullres",
        patch=(16, 16, 16),
        spacing=(1.0, 1.0, 1.0),
        folds=(0,),
        features=(4, 8),
        seed=0,
    )


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("name", ["plans.json", "dataset.json", "fold_0/checkpoint_final.pth"])
def test_import_nnunet_refuses_a_fifo_without_hanging(nnunet_folder, tmp_path, name):
    from atso_fast import import_nnunet

    folder = copy_folder(nnunet_folder, tmp_path / "model")
    (folder / name).unlink()
    os.mkfifo(folder / name)
    with pytest.raises(PackageError, match="FIFO"):
        no_hang(import_nnunet, folder, tmp_path / "pkg", timeout=60, fifos=(folder / name,))


@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("plans.json", "{not json", "unreadable JSON"),
        ("dataset.json", "\xff\xfe", "UTF-8"),
    ],
)
def test_import_nnunet_names_a_malformed_json(nnunet_folder, tmp_path, name, text, problem):
    from atso_fast import import_nnunet

    folder = copy_folder(nnunet_folder, tmp_path / "model")
    (folder / name).write_bytes(text.encode("latin-1"))
    with pytest.raises(PackageError, match=problem) as info:
        import_nnunet(folder, tmp_path / "pkg")
    assert name in str(info.value)


def test_training_data_with_a_fifo_is_refused_without_hanging(tmp_path):
    root = tmp_path / "data"
    make_case(root / "imagesTr" / "a_0000.nii.gz", 0)
    label = root / "labelsTr" / "a.nii.gz"
    label.parent.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((9, 8, 7), np.uint8), np.eye(4)), label)
    os.mkfifo(root / "imagesTr" / "b_0000.nii.gz")
    shutil.copy(label, root / "labelsTr" / "b.nii.gz")
    with pytest.raises(InputError, match="b_0000.nii.gz.*FIFO"):
        no_hang(load_raw, root, timeout=30, fifos=(root / "imagesTr" / "b_0000.nii.gz",))


def test_training_list_and_config_fifos_are_refused(tmp_path):
    from atso_fast.train.cli import load_config

    for name in ("list.yaml", "config.json"):
        os.mkfifo(tmp_path / name)
    with pytest.raises(InputError, match="FIFO"):
        no_hang(load_raw, tmp_path / "list.yaml", timeout=30, fifos=(tmp_path / "list.yaml",))
    with pytest.raises(InputError, match="FIFO"):
        no_hang(load_config, tmp_path / "config.json", timeout=30, fifos=(tmp_path / "config.json",))
    (tmp_path / "bad.json").write_text(json.dumps([1])[:-1])
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_raw(tmp_path / "bad.json")


def test_a_truncated_or_fifo_trainer_checkpoint_names_the_file(tmp_path):
    import torch

    from atso_fast.train.atso import load_checkpoint_file

    path = tmp_path / "checkpoint.pt"
    torch.save({"round": 1, "weights": torch.ones(1000)}, path)
    assert load_checkpoint_file(path)["round"] == 1
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match="checkpoint.pt: not a readable atso-fast checkpoint"):
        load_checkpoint_file(path)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(InputError, match="FIFO"):
        no_hang(load_checkpoint_file, path, timeout=20, fifos=(path,))


def _edit_json(folder, name, edit):
    data = json.loads((folder / name).read_text())
    (folder / name).write_text(json.dumps(edit(data)))


def _config(plans):
    return next(iter(plans["configurations"].values()))


@pytest.mark.parametrize(
    "name, edit, problem",
    [
        ("plans.json", lambda p: [1, 2], "must hold a JSON object"),
        ("dataset.json", lambda d: [1], "must hold a JSON object"),
        ("plans.json", lambda p: (_config(p).update(spacing="x"), p)[1], "malformed"),
        ("plans.json", lambda p: (_config(p).update(architecture=None), p)[1], "malformed"),
        ("plans.json", lambda p: {**p, "foreground_intensity_properties_per_channel": "x"}, "malformed"),
        ("plans.json", lambda p: (_config(p).update(patch_size=[1024, 1024, 1024]), p)[1], "more than"),
        ("plans.json", lambda p: (_config(p).update(patch_size="abc"), p)[1], "window must be"),
    ],
)
def test_import_nnunet_refuses_malformed_plans_without_a_traceback(nnunet_folder, tmp_path, name, edit, problem):
    from atso_fast import import_nnunet

    folder = copy_folder(nnunet_folder, tmp_path / "model")
    _edit_json(folder, name, edit)
    with pytest.raises(PackageError, match=problem):
        import_nnunet(folder, tmp_path / "pkg")


def test_export_refuses_a_window_or_class_count_that_cannot_fit(tmp_path):
    import torch

    from atso_fast import export_model

    net = torch.nn.Conv3d(1, 2, 1)
    with pytest.raises(PackageError, match="more than the 16777216"):
        export_model(net, tmp_path / "a", window=(512, 512, 512), num_classes=2)
    with pytest.raises(PackageError, match="num_classes must be an integer in"):
        export_model(net, tmp_path / "b", window=(8, 8, 8), num_classes=70000)


def test_a_class_count_whose_accumulator_cannot_fit_fails_the_case(tmp_path, monkeypatch):
    import torch

    from atso_fast.engine import Relabeler
    from atso_fast.io import limits

    relabeler = Relabeler.from_module(torch.nn.Conv3d(1, 3, 1), window=(4, 8, 8), num_classes=3)
    monkeypatch.setattr(limits, "memory_budget", lambda: 4096)
    with pytest.raises(InputError, match="relabelling a 4x8x8 grid with 3 classes"):
        relabeler.relabel_volume(np.zeros((4, 8, 8), np.float32))
    monkeypatch.undo()
    assert relabeler.relabel_volume(np.zeros((4, 8, 8), np.float32)).labels.shape == (4, 8, 8)


def _labelled_folder(root, value):
    make_case(root / "imagesTr" / "a_0000.nii.gz", 0)
    label = np.zeros((9, 8, 7), np.uint8)
    label[2, 3, 4] = value
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / "a.nii.gz")
    return root


def test_a_label_value_that_is_no_class_names_file_and_value(tmp_path):
    from atso_fast.train.cache import build_cache
    from atso_fast.train.data import read_listing

    root = _labelled_folder(tmp_path / "data", 52)
    with pytest.raises(ValueError, match=r"labelsTr/a.nii.gz: label value\(s\) 52 \(1 voxels\) are not classes"):
        load_raw(root, num_classes=3)
    listing, base = read_listing(root)
    with pytest.raises(ValueError, match=r"labelsTr/a.nii.gz: label value\(s\) 52"):
        build_cache(
            listing,
            base,
            tmp_path / "cache",
            window=(4, 4, 4),
            in_channels=1,
            num_classes=3,
            normalization="zscore",
            spacing=[1.0, 1.0, 1.0],
            progress=False,
        )
    ok = _labelled_folder(tmp_path / "ok", 255)  # the ignore label is allowed
    assert load_raw(ok, num_classes=3)[0]["labelled"][0].label.max() == 255


def test_the_package_carries_no_test_hook():
    import atso_fast.train.atso as atso
    import atso_fast.train.disk_store as disk_store
    import atso_fast.train.stores as stores

    for module in (atso, stores, disk_store):
        source = Path(module.__file__).read_text()
        assert "ATSO_FAST_TEST" not in source and "SIGKILL" not in source and "os.kill" not in source


def test_training_reports_progress_with_an_eta(capsys):
    from atso_fast.progress import Progress

    progress = Progress("atso round 1/2: fine-tune", 4, every=0.0)
    for step in range(1, 5):
        progress.update(step)
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "atso-fast: atso round 1/2: fine-tune: 4 steps"
    assert any("step 2/4 (50%)" in line and "ETA" in line for line in lines)
    assert lines[-1].startswith("atso-fast: atso round 1/2: fine-tune: done, 4 steps in")


def test_training_curves_picture():
    import io

    from PIL import Image

    from atso_fast.train.curves import curves_png

    history = [
        {"round": 0, "train": {"loss": 1.0}, "val_mean_dice": 0.5, "monitor": {}},
        {"round": 1, "train": {"loss": 0.7}, "val_mean_dice": 0.6, "monitor": {"U1": {"pseudo_dice": 0.55}}},
        {"round": 2, "train": {"loss": None}, "val_mean_dice": None, "monitor": {"U2": {"pseudo_dice": 0.6}}},
    ]
    with Image.open(io.BytesIO(curves_png(history, "atso"))) as picture:
        assert picture.format == "PNG" and picture.size == (900, 340)
