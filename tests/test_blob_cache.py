"""Compiled-model caches are not trusted blindly (issue 26): a planted, damaged, linked or
foreign-writable blob is never loaded; the model is compiled again."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from test_runtimes import _batch, _openvino, needs_openvino, package  # noqa: F401 (package: a fixture)

from atso_fast.io.blob_cache import BlobCache


@pytest.fixture
def cache(tmp_path):
    folder = tmp_path / "cache"
    store = BlobCache(folder, "test")
    store.store("k", b"compiled model")
    return store


def test_a_stored_blob_loads_back(cache):
    assert cache.load("k") == b"compiled model"
    assert oct((cache.folder / "k.blob").stat().st_mode & 0o777) == "0o600"
    assert oct(cache.folder.stat().st_mode & 0o777) == "0o700"


def test_a_blob_without_its_recorded_hash_is_ignored(cache):
    (cache.folder / "planted.blob").write_bytes(b"evil")
    assert cache.load("planted") is None
    (cache.folder / "planted.sha256").write_text("0" * 64)
    assert cache.load("planted") is None
    (cache.folder / "k.blob").write_bytes(b"compiled modeL")  # damaged after the hash was recorded
    assert cache.load("k") is None


def test_load_with_hands_back_what_use_built_only_from_a_blob_that_passes(cache):
    seen = []

    def use(data):
        seen.append(bytes(data))
        return ("built", data)

    assert cache.load_with("k", use) == ("built", b"compiled model")
    assert cache.load_with("missing", use) is None  # nothing read, nothing built
    assert seen == [b"compiled model"]
    (cache.folder / "k.blob").write_bytes(b"compiled modeL")  # damaged: built, then dropped
    assert cache.load_with("k", use) is None
    assert seen[-1] == b"compiled modeL"
    (cache.folder / "k.blob").write_bytes(b"compiled model")
    assert cache.load_with("k", lambda data: None) is None  # use refused it (another build)


def test_a_linked_blob_is_ignored(cache, tmp_path):
    elsewhere = tmp_path / "elsewhere.blob"
    elsewhere.write_bytes(b"evil")
    (cache.folder / "k.blob").unlink()
    os.symlink(elsewhere, cache.folder / "k.blob")
    (cache.folder / "k.sha256").write_text(hashlib.sha256(b"evil").hexdigest())
    assert cache.load("k") is None


@pytest.mark.parametrize("mode", [0o770, 0o777])
def test_a_folder_others_can_write_is_neither_read_nor_written(cache, mode):
    os.chmod(cache.folder, mode)
    assert cache.load("k") is None
    with pytest.warns(RuntimeWarning, match="not a private folder"):
        cache.store("k2", b"x")
    assert not (cache.folder / "k2.blob").exists()


def test_a_linked_folder_is_not_trusted(cache, tmp_path):
    link = tmp_path / "link"
    os.symlink(cache.folder, link)
    assert BlobCache(link, "test").load("k") is None


@needs_openvino
def test_openvino_ignores_a_blob_planted_under_its_key(package, tmp_path):  # noqa: F811
    """The blob of another network with the same shapes, planted under this package's key, would
    give other outputs: the run must compile the package's own network instead."""
    from test_runtimes import random_net

    from atso_fast.package import export_model, load_package

    batch = _batch(np.random.default_rng(0))
    want = _openvino(package, tmp_path)(batch).copy()
    blob = next((tmp_path / "cache").glob("*.blob"))
    other = load_package(
        export_model(random_net(classes=3, seed=7), tmp_path / "other_pkg", window=(8, 8, 8), num_classes=3)
    )
    foreign = _openvino(other, tmp_path / "other")(batch).copy()
    assert not np.allclose(foreign, want)
    blob.write_bytes(next((tmp_path / "other" / "cache").glob("*.blob")).read_bytes())
    np.testing.assert_array_equal(_openvino(package, tmp_path)(batch), want)
