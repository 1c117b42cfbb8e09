"""Compiled-model caches are not trusted blindly (issue 26): a planted, damaged, linked or
foreign-writable blob is never loaded; the model is compiled again."""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import pytest
from test_runtimes import _batch, _openvino, needs_openvino, package  # noqa: F401 (package: a fixture)

from atso_fast.io.atomic import temp_path
from atso_fast.io.blob_cache import DEFAULT_CACHE_GB, BlobCache, cache_limit


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


def _aged(cache, key, seconds_ago):
    when = time.time_ns() - int(seconds_ago * 1e9)
    os.utime(cache.folder / f"{key}.blob", ns=(when, when))


def test_the_least_recently_used_blobs_go_beyond_the_size_limit(cache, monkeypatch):
    monkeypatch.setenv("ATSO_FAST_CACHE_GB", str(250 / 2**30))  # room for two 100-byte blobs
    cache.store("a", b"a" * 100)
    cache.store("b", b"b" * 100)
    _aged(cache, "k", 300)
    _aged(cache, "a", 200)
    _aged(cache, "b", 100)
    assert cache.load("a") == b"a" * 100  # a load makes "a" the most recently used ...
    cache.store("c", b"c" * 100)  # 314 bytes: the oldest go until 250 fit
    assert cache.load("k") is None and cache.load("b") is None  # ... so "k", then "b" go
    assert not (cache.folder / "b.sha256").exists()
    assert cache.load("a") == b"a" * 100 and cache.load("c") == b"c" * 100


def test_a_blob_larger_than_the_limit_or_a_limit_of_zero_stores_nothing(cache, monkeypatch):
    monkeypatch.setenv("ATSO_FAST_CACHE_GB", str(50 / 2**30))
    cache.store("big", b"x" * 100)
    assert not (cache.folder / "big.blob").exists()
    assert cache.load("k") == b"compiled model"  # what was there stays
    monkeypatch.setenv("ATSO_FAST_CACHE_GB", "0")
    cache.store("small", b"x")
    assert cache.load("small") is None


@pytest.mark.parametrize("value", ["many", "-1", "nan", "inf"])
def test_a_bad_limit_is_warned_about_and_the_default_used(value, monkeypatch):
    monkeypatch.setenv("ATSO_FAST_CACHE_GB", value)
    with pytest.warns(RuntimeWarning, match="ATSO_FAST_CACHE_GB"):
        assert cache_limit() == int(DEFAULT_CACHE_GB * 2**30)


def test_a_store_removes_temp_files_of_dead_writers_only(cache):
    dead = cache.folder / ".x.blob.atso-999999999-1-abcd1234.tmp"  # no such process
    live = cache.folder / temp_path(cache.folder / "y.blob").name  # this process
    dead.write_bytes(b"half")
    live.write_bytes(b"half")
    cache.store("k2", b"data")
    assert not dead.exists() and live.exists()


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
