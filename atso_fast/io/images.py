"""PNG and JPEG pictures (natural images, label PNGs) through Pillow.

Layout (the registry's, as SimpleITK's vector images): a colour frame ``(H, W, 3)`` becomes
channels ``(3, 1, H, W)``; a single-band picture ``(H, W)`` becomes ``(1, H, W)``. The stored
pixel grid is kept: EXIF orientation is not applied (labels must line up with the stored
pixels, as in every segmentation toolkit).

Modes (Pillow's names), the rules:
    ``RGB`` (8-bit colour; 16-bit colour PNGs are read at 8 bits by Pillow)  -> 3 channels uint8
    ``RGBA`` (alpha dropped), ``CMYK``/``YCbCr`` JPEGs (converted)          -> 3 channels uint8
    ``L`` (8-bit grey), ``LA`` (alpha dropped), ``1`` (bilevel, 0/1)         -> 1 channel uint8
    ``P`` (palette): the palette *indices* (label PNGs such as PASCAL VOC's)  -> 1 channel uint8
    ``I;16`` / ``I;16B`` (16-bit grey: 16-bit label PNGs)                      -> 1 channel uint16
    ``I`` (32-bit int), ``F`` (32-bit float)                                   -> int32 / float32
An animated PNG gives its first frame.

Untrusted input: the file is opened through :func:`atso_fast.io.files.open_regular` (no FIFO
is ever opened); the header's size is checked before any pixel is decoded, against Pillow's
``Image.MAX_IMAGE_PIXELS`` (read at each call, never changed; ``None`` turns that check off)
and the memory budget (:func:`atso_fast.io.limits.check_bytes`), so a 100000 x 100000 header
is refused without allocating. Truncated and corrupt files raise :class:`InputError` naming the
file. Pictures carry no physical pixel size: ``spacing`` is ``None`` (as for ``.npy``).

Writing: label maps as single-band PNGs (``L``, uint8; ``I;16``, uint16 when the label dtype is
uint16, e.g. more than 255 classes), confidence as 8-bit PNG, atomically. A JPEG input gets PNG
outputs (JPEG is lossy: a label map is never written as one).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from atso_fast.io.base import InputError, VolumeMeta
from atso_fast.io.files import open_regular
from atso_fast.io.limits import DECODE_SHARE, check_bytes
from atso_fast.io.registry import ImageFormat, register_format

__all__ = ["JpegFormat", "PNG_LEVEL", "PictureFormat", "PngFormat", "decode_picture", "encode_png", "picture_limit"]

PNG_LEVEL = 1
"""zlib level of written PNGs (fast; label maps compress well at any level)."""

_MODES: dict[str, tuple[str | None, np.dtype]] = {
    "RGB": (None, np.dtype(np.uint8)),
    "RGBA": ("RGB", np.dtype(np.uint8)),
    "CMYK": ("RGB", np.dtype(np.uint8)),
    "YCbCr": ("RGB", np.dtype(np.uint8)),
    "L": (None, np.dtype(np.uint8)),
    "LA": ("L", np.dtype(np.uint8)),
    "1": (None, np.dtype(np.uint8)),
    "P": (None, np.dtype(np.uint8)),
    "I;16": (None, np.dtype(np.uint16)),
    "I;16B": (None, np.dtype(np.uint16)),
    "I;16L": (None, np.dtype(np.uint16)),
    "I": (None, np.dtype(np.int32)),
    "F": (None, np.dtype(np.float32)),
}
"""Pillow mode -> (mode converted to first, or None; dtype of the returned array)."""


def picture_limit() -> int | None:
    """The most pixels a picture may have: Pillow's ``Image.MAX_IMAGE_PIXELS`` now (its default is
    about 89 million; ``None``: no pixel limit, the memory budget still applies)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else int(limit)


def _plugin(kind: str) -> Any:
    """Pillow's image class for ``kind``: opening through it parses the header only (``Image.open``
    would also warn, or raise, about the size; the check here is our own, made before decoding)."""
    if kind == "png":
        from PIL import PngImagePlugin

        return PngImagePlugin.PngImageFile
    from PIL import JpegImagePlugin

    return JpegImagePlugin.JpegImageFile


def _check_size(picture: Any, path: Path, label: str) -> tuple[str | None, np.dtype]:
    """Refuse a picture whose header claims too many pixels, or a mode this reader does not take."""
    width, height = picture.size
    if width < 1 or height < 1:
        raise InputError(f"{path}: {label} header claims an empty picture ({width} x {height})")
    limit = picture_limit()
    if limit is not None and width * height > limit:
        raise InputError(
            f"{path}: {label} header claims {width} x {height} pixels ({width * height}), more than the "
            f"{limit} allowed (Pillow's MAX_IMAGE_PIXELS): a possible decompression bomb; refused "
            "before decoding"
        )
    if picture.mode not in _MODES:
        raise InputError(
            f"{path}: {label} picture mode {picture.mode!r} is not supported (RGB, RGBA, L, LA, P, 1, I;16, I, F)"
        )
    convert, dtype = _MODES[picture.mode]
    bands = 3 if (convert or picture.mode) in ("RGB", "RGBA", "CMYK", "YCbCr") else 1
    check_bytes(
        path,
        width * height * bands * dtype.itemsize * (2 if convert else 1),
        f"the decoded {width} x {height} picture",
        share=DECODE_SHARE,
    )
    return convert, dtype


def decode_picture(handle: Any, path: Path, kind: str) -> np.ndarray:
    """The pixels of a PNG (``kind="png"``) or JPEG (``"jpeg"``) read from ``handle``: ``(H, W)`` or
    ``(H, W, 3)`` by the module's mode rules.

    Raises:
        InputError: not a valid picture of that kind, truncated or corrupt data, an unsupported
            mode, or a size over the pixel limit or the memory budget (checked before decoding).
    """
    label = "PNG" if kind == "png" else "JPEG"
    try:
        picture = _plugin(kind)(handle)
    except Exception as exc:  # SyntaxError (bad magic), OSError, ValueError (huge text chunks), struct.error
        raise InputError(f"{path}: not a valid {label} file ({_reason(exc)})") from None
    try:
        convert, dtype = _check_size(picture, path, label)
        if convert is not None:
            picture = picture.convert(convert)  # loads the pixels first
        else:
            picture.load()
        array = np.asarray(picture)
    except InputError:
        raise
    except Exception as exc:  # OSError "image file is truncated", zlib errors, broken Huffman data
        raise InputError(f"{path}: corrupt or truncated {label} data ({_reason(exc)})") from None
    finally:
        picture.close()
    return np.ascontiguousarray(array, dtype=dtype)


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a ``(H, W)`` uint8 or uint16 single-band map, or a ``(H, W, 3)`` uint8 picture.

    Raises:
        ValueError: another shape or dtype.
    """
    from PIL import Image

    array = np.ascontiguousarray(array)
    rgb = array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8
    if not rgb and not (array.ndim == 2 and array.dtype in (np.uint8, np.uint16)):
        raise ValueError(f"a PNG holds (H, W) uint8/uint16 or (H, W, 3) uint8, got {array.shape} {array.dtype}")
    picture = Image.fromarray(array)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()


class PictureFormat(ImageFormat):
    """A Pillow picture format; outputs are PNG (see the module docstring for the rules)."""

    kind: ClassVar[str]

    @property
    def output_suffix(self) -> str:
        return ".png"

    def read(self, path: Path) -> tuple[np.ndarray, np.ndarray, Any, tuple[int, ...]]:
        fd = open_regular(path)
        try:
            with os.fdopen(fd, "rb", closefd=False) as handle:
                pixels = decode_picture(handle, path, self.kind)
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
        finally:
            os.close(fd)
        if pixels.ndim == 3:  # (H, W, 3) -> channels (3, 1, H, W)
            pixels = np.ascontiguousarray(np.moveaxis(pixels, -1, 0)[:, None])
        header = {"mode": "RGB" if pixels.ndim == 4 else "single band", "format": self.kind}
        return pixels, np.eye(4), header, tuple(int(n) for n in pixels.shape)

    def geometry(self, affine: np.ndarray, header: Any, shape: tuple[int, ...]) -> tuple[None, None, None]:
        """A picture has no physical pixel size, origin or direction."""
        return None, None, None

    def encode(self, path: Path, array: np.ndarray, meta: VolumeMeta, key: str) -> bytes:
        """A ``(1, H, W)`` map as a single-band PNG (labels uint8/uint16, confidence uint8)."""
        if array.ndim != 3 or array.shape[0] != 1:
            raise ValueError(
                f"{path}: a PNG holds one 2D map, got shape {array.shape} (Z, Y, X); 3D label maps "
                "need a volume format (.nii.gz, .nrrd, ...)"
            )
        if array.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"{path}: PNG {key} must be uint8 or uint16, got {array.dtype}")
        return encode_png(array[0])


class PngFormat(PictureFormat):
    """PNG (``.png``): 8-bit colour frames, 8/16-bit label maps."""

    name = "png"
    suffixes = (".png",)
    kind = "png"


class JpegFormat(PictureFormat):
    """JPEG (``.jpg``, ``.jpeg``): read only; label maps for JPEG frames are PNGs."""

    name = "jpeg"
    suffixes = (".jpeg", ".jpg")
    kind = "jpeg"

    def encode(self, path: Path, array: np.ndarray, meta: VolumeMeta, key: str) -> bytes:
        raise ValueError(f"{path}: {key} are never written as JPEG (lossy); use a .png name")


register_format(PngFormat())
register_format(JpegFormat())
