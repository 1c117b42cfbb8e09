"""nnU-Net multi-channel inputs (issue 26): ``CASE_0000``, ``CASE_0001``, ... of a folder are one
case, checked against the model's input channels, stacked in channel order."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from atso_fast.archive import relabel_archive
from atso_fast.engine import Relabeler
from atso_fast.io import Manifest, read_volume
from atso_fast.io.naming import channel_groups


class SecondChannelWins(torch.nn.Module):
    """Two classes: 1 where channel 1 exceeds channel 0, else 0 (so channel order matters)."""

    def forward(self, x):
        return torch.stack([x[:, 0], x[:, 1]], dim=1) * 10


def save(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0])), path)


def test_channel_groups_follow_nnunets_rule():
    paths = [
        Path(p)
        for p in (
            "d/a_0001.nii.gz",
            "d/a_0000.nii.gz",
            "d/scan_0001.nii.gz",
            "d/scan_0002.nii.gz",
            "e/a_0001.nii.gz",
            "d/c.npy",
        )
    ]
    assert channel_groups(paths) == [
        (Path("d/a_0000.nii.gz"), Path("d/a_0001.nii.gz")),
        (Path("d/scan_0001.nii.gz"),),
        (Path("d/scan_0002.nii.gz"),),
        (Path("e/a_0001.nii.gz"),),
        (Path("d/c.npy"),),
    ]


def relabel(tmp_path, in_channels):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    ch0, ch1 = rng.normal(size=(6, 7, 8)), rng.normal(size=(6, 7, 8))
    save(folder / "a_0000.nii.gz", ch0)
    save(folder / "a_0001.nii.gz", ch1)
    save(folder / "b_0000.nii.gz", ch0)  # channel _0001 missing
    for k in range(3):
        save(folder / f"c_{k:04d}.nii.gz", ch0)  # one channel too many
    module = SecondChannelWins() if in_channels == 2 else torch.nn.Conv3d(1, 2, 1)
    relabeler = Relabeler.from_module(module, window=(4, 4, 4), num_classes=2, in_channels=in_channels)
    summary = relabel_archive(relabeler, folder, tmp_path / "out", progress=False)
    return summary, Manifest(tmp_path / "out" / "manifest.jsonl").latest(), ch0, ch1


def test_two_channel_cases_are_stacked_and_checked(tmp_path):
    summary, rows, ch0, ch1 = relabel(tmp_path, in_channels=2)
    assert summary["total"] == 3 and summary["done"] == 1 and set(rows) == {"a", "b", "c"}
    labels, _ = read_volume(tmp_path / "out" / "a.nii.gz")
    np.testing.assert_array_equal(labels, (ch1 > ch0).T.astype(np.uint8))
    assert "takes 2 input channel(s) (_0000, _0001); this case has 1 channel file(s): b_0000" in rows["b"]["error"]
    assert "this case has 3 channel file(s): c_0000.nii.gz, c_0001.nii.gz, c_0002.nii.gz" in rows["c"]["error"]


def test_a_one_channel_model_refuses_a_multi_channel_case(tmp_path):
    _, rows, _, _ = relabel(tmp_path, in_channels=1)
    assert rows["b"]["status"] == "ok"
    assert rows["a"]["status"] == "failed" and "takes 1 input channel(s)" in rows["a"]["error"]


def test_channels_on_different_grids_are_refused(tmp_path):
    from atso_fast.archive.pipeline import read_input
    from atso_fast.io import InputError

    save(tmp_path / "a_0000.nii.gz", np.zeros((6, 7, 8)))
    save(tmp_path / "a_0001.nii.gz", np.zeros((6, 7, 9)))
    with pytest.raises(InputError, match="must share one grid"):
        read_input([tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"], 2)
