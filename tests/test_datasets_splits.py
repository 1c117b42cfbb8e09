"""Interleaved slice splits: disjoint, covering, every band in every set, guards around held-out chunks."""

from __future__ import annotations

import pytest

from atso_fast.datasets.splits import interleaved_split


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_interleaved_split_covers_every_band_and_guards_held_out_slices(seed):
    split = interleaved_split(112, bands=7, test_chunk=2, val_chunk=1, labelled_per_band=2, seed=seed)
    everything = sorted(i for v in split.values() for i in v)
    assert everything == list(range(112))  # disjoint and covering
    assert (len(split["labelled"]), len(split["unlabelled"]), len(split["val"]), len(split["test"])) == (14, 56, 7, 14)
    for b in range(7):
        band = set(range(16 * b, 16 * (b + 1)))
        for role in ("labelled", "unlabelled", "val", "test"):
            assert band & set(split[role]), (role, b)  # every band feeds every set
    training = set(split["labelled"]) | set(split["unlabelled"])
    for i in split["test"] + split["val"]:
        assert not {i - 1, i + 1} & training  # a guard (or a held-out slice) on both sides
    assert split == interleaved_split(112, bands=7, test_chunk=2, val_chunk=1, labelled_per_band=2, seed=seed)


def test_interleaved_split_changes_with_the_seed_and_validates():
    a = interleaved_split(60, bands=3, seed=0)
    assert a != interleaved_split(60, bands=3, seed=1) and a["val"] == []
    with pytest.raises(ValueError, match="cannot hold"):
        interleaved_split(20, bands=4, test_chunk=2, val_chunk=1)
    with pytest.raises(ValueError, match="bands"):
        interleaved_split(20, bands=0)
