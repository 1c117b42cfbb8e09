"""PNG/JPEG in the format registry (issue 24): layout, modes, label PNGs, and untrusted input
(bombs, truncated and corrupt files, FIFOs) refused with one clear line."""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from atso_fast.io import InputError, read_volume, write_confidence, write_labels
from atso_fast.io import limits as io_limits
from atso_fast.io.images import encode_png


def save(path, array, **kw):
    Image.fromarray(array).save(path, **kw)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming ``width x height`` RGB pixels, with a few bytes of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def test_rgb_png_is_three_channels_of_one_slice(tmp_path, rng):
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    array, meta = read_volume(save(tmp_path / "frame.png", pixels))
    assert array.shape == (3, 1, 5, 7) and array.dtype == np.uint8 and array.flags.c_contiguous
    np.testing.assert_array_equal(array[:, 0], np.moveaxis(pixels, -1, 0))
    assert meta.fmt == "png" and meta.spatial_shape == (1, 5, 7) and meta.spacing is None


def test_jpeg_reads_as_rgb_and_its_labels_are_png(tmp_path):
    pixels = np.full((8, 16, 3), (200, 100, 50), np.uint8)
    array, meta = read_volume(save(tmp_path / "frame.jpg", pixels, quality=95))
    assert array.shape == (3, 1, 8, 16) and meta.fmt == "jpeg"
    assert np.abs(array[:, 0, 4, 8].astype(int) - (200, 100, 50)).max() <= 3
    labels = np.ones((1, 8, 16), np.uint8)
    with pytest.raises(ValueError, match="never written as JPEG"):
        write_labels(tmp_path / "labels.jpg", labels, meta)
    write_labels(tmp_path / "labels.png", labels, meta)
    assert read_volume(tmp_path / "labels.png")[0].tolist() == labels.tolist()


@pytest.mark.parametrize(
    "mode, data, want",
    [
        ("L", np.array([[0, 7], [255, 3]], np.uint8), [[0, 7], [255, 3]]),
        ("P", np.array([[0, 1], [2, 19]], np.uint8), [[0, 1], [2, 19]]),  # palette indices (label PNGs)
        ("1", np.array([[0, 255], [255, 0]], np.uint8), [[0, 1], [1, 0]]),
    ],
)
def test_single_band_modes(tmp_path, mode, data, want):
    picture = Image.new(mode, data.shape[::-1])
    picture.putdata(data.ravel().tolist())
    if mode == "P":
        picture.putpalette([v for k in range(256) for v in (k, 255 - k, 0)])
    picture.save(tmp_path / "x.png")
    array, _ = read_volume(tmp_path / "x.png")
    assert array.shape == (1, 2, 2) and array.dtype == np.uint8 and array[0].tolist() == want


def test_rgba_drops_alpha(tmp_path):
    pixels = np.zeros((3, 4, 4), np.uint8)
    pixels[..., 0], pixels[..., 3] = 9, 0
    array, _ = read_volume(save(tmp_path / "x.png", pixels))
    assert array.shape == (3, 1, 3, 4) and (array[0] == 9).all()


def test_label_png_round_trip_8_and_16_bit(tmp_path):
    _, meta = read_volume(save(tmp_path / "frame.png", np.zeros((4, 6, 3), np.uint8)))
    small = np.arange(24, dtype=np.uint8).reshape(1, 4, 6)
    big = (np.arange(24, dtype=np.uint16) * 1000).reshape(1, 4, 6)
    for name, labels in (("small.png", small), ("big.png", big)):
        write_labels(tmp_path / name, labels, meta)
        back, _ = read_volume(tmp_path / name)
        assert back.dtype == labels.dtype and back.tolist() == labels.tolist()
    with Image.open(tmp_path / "big.png") as picture:
        assert picture.mode.startswith("I;16")
    write_confidence(tmp_path / "conf.png", np.full((1, 4, 6), 200, np.uint8), meta)
    assert read_volume(tmp_path / "conf.png")[0].max() == 200
    deep = dataclasses.replace(meta, spatial_shape=(2, 4, 6))
    with pytest.raises(ValueError, match="one 2D map"):
        write_labels(tmp_path / "deep.png", np.zeros((2, 4, 6), np.uint8), deep)


def test_bomb_header_is_refused_without_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"bomb\.png: PNG header claims 100000 x 100000 pixels .*decompression"):
            read_volume(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_memory_budget_refuses_a_big_picture_when_the_pixel_limit_is_off(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(io_limits, "memory_budget", lambda: 1 << 30)
    path = tmp_path / "big.png"
    path.write_bytes(bomb_png(40_000, 40_000))  # 4.8 GB of RGB
    with pytest.raises(InputError, match=r"big\.png: the decoded 40000 x 40000 picture needs .* before allocating"):
        read_volume(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a picture at all", r"not a valid PNG file"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 40, r"not a valid PNG file"),  # a JPEG start under a .png name
    ],
)
def test_garbage_is_named(tmp_path, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"bad\.png: " + message):
        read_volume(path)


def test_truncated_png_and_jpeg(tmp_path, rng):
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for name in ("cut.png", "cut.jpg"):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG" if name.endswith("png") else "JPEG")
        (tmp_path / name).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        with pytest.raises(InputError, match=rf"{name}: corrupt or truncated (PNG|JPEG) data"):
            read_volume(tmp_path / name)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_named_png_is_never_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(InputError, match="FIFO"):
        read_volume(tmp_path / "pipe.png")


def test_encode_png_refuses_other_arrays():
    with pytest.raises(ValueError, match=r"\(H, W\) uint8/uint16"):
        encode_png(np.zeros((4, 4), np.float32))
    assert encode_png(np.zeros((4, 4, 3), np.uint8)).startswith(b"\x89PNG")
