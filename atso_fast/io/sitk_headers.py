"""NRRD and MetaImage headers checked before SimpleITK sees a byte, and files staged privately.

Both formats let a header name its data file (NRRD ``data file:``, MetaImage ``ElementDataFile``),
and ITK follows that name anywhere: ``/etc/passwd``, ``../../secret.raw``, a FIFO or
``/dev/stdin``. So the header is parsed here first: a data file must be one plain name in the
header's own folder (no ``/``, no ``..``, no list or pattern form, a link only to a file in the
same folder), a regular file of at least the size the header implies for raw data; the decoded
size must fit the memory budget. Then the header and its data are copied through descriptors
opened without blocking into a private temporary folder, and SimpleITK reads that copy: the
file it opens is the one that was checked, whatever happens to the input meanwhile.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from isal import isal_zlib

from atso_fast.io.base import InputError
from atso_fast.io.files import open_regular
from atso_fast.io.limits import DECODE_SHARE, check_bytes

__all__ = ["HeaderFacts", "parse_header", "staged_copy"]

MAX_HEADER_BYTES = 1 << 20
"""Longest header read (NRRD key/value lines can be many, never a megabyte)."""

_COPY_CHUNK = 1 << 22
_RAW_SLACK = 1 << 20

_NRRD_SIZES = (
    ("long long", 8),
    ("longlong", 8),
    ("int64", 8),
    ("double", 8),
    ("char", 1),
    ("int8", 1),
    ("short", 2),
    ("int16", 2),
    ("float", 4),
    ("int32", 4),
    ("int", 4),
)
_NRRD_TEXT = {"txt", "text", "ascii", "hex"}
_TEXT_FACTOR = 32
"""Text encodings take at most this many characters per stored byte (with separators)."""
_MET_SIZES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


@dataclass(frozen=True)
class HeaderFacts:
    """What a header says about its data.

    Attributes:
        header_bytes: length of the header (the data of an attached file starts after it).
        data_file: the detached data file's name, or ``None`` when the data follow the header.
        decoded_bytes: bytes of the decoded image (all sizes x components x element size).
        encoding: ``"raw"``, ``"compressed"`` or ``"text"``.
        skip: bytes skipped before the data (``-1``: the raw data end the file).
    """

    header_bytes: int
    data_file: str | None
    decoded_bytes: int
    encoding: str
    skip: int = 0

    def stored_range(self) -> tuple[int, int]:
        """Least and most bytes the data may take on disk (after the header, if attached): raw
        data are exact; compressed data never grow by more than 10%; text is at most 32 characters
        a byte. A file outside the range is truncated or padded (a sparse 8 GiB tail). With
        ``skip == -1`` (raw data at the end) up to 1 MiB may stand before the data."""
        skip = max(self.skip, 0)
        if self.encoding == "raw":  # a few trailing bytes (a newline) are tolerated
            return self.decoded_bytes + skip, self.decoded_bytes + skip + _RAW_SLACK
        factor = _TEXT_FACTOR if self.encoding == "text" else 1.1
        return 1, skip + int(self.decoded_bytes * factor) + (1 << 20)


def _ints(text: str, path: Path, field: str) -> list[int]:
    try:
        values = [int(v) for v in text.split()]
    except ValueError:
        raise InputError(f"{path}: header field {field!r} is not a list of integers: {text[:80]!r}") from None
    if not values or min(values) < 1:
        raise InputError(f"{path}: header field {field!r} must hold positive sizes, got {text[:80]!r}")
    return values


def _nrrd_itemsize(kind: str, path: Path) -> int:
    kind = kind.strip().lower()
    for word, size in _NRRD_SIZES:
        if word in kind:
            return size
    raise InputError(f"{path}: unsupported NRRD type {kind!r}")


def _lines(head: bytes) -> Iterator[tuple[str, int]]:
    """Each header line (newline stripped) with the offset just past it; the last line may lack
    its newline (a detached header can end the file)."""
    pos = 0
    while pos < len(head):
        end = head.find(b"\n", pos)
        end = len(head) if end < 0 else end
        yield head[pos:end].decode("latin-1").rstrip("\r"), end + 1
        pos = end + 1


def _split_header(head: bytes, path: Path, nrrd: bool) -> tuple[list[tuple[str, str]], int]:
    """``[(field, value)]`` and the header's length in bytes. NRRD: up to the first blank line
    (or the end of a detached header); MetaImage: up to ``ElementDataFile``, its last field."""
    fields: list[tuple[str, str]] = []
    sep = ":" if nrrd else "="
    end = 0
    for line, end in _lines(head):
        if nrrd and not line:
            return fields, end
        if not line.strip() or (nrrd and (line.startswith("#") or ":=" in line or line.startswith("NRRD"))):
            continue
        if sep not in line:
            raise InputError(f"{path}: malformed header line {line[:80]!r}")
        key, value = line.split(sep, 1)
        fields.append((key.strip().lower(), value.strip()))
        if not nrrd and fields[-1][0] == "elementdatafile":
            return fields, end
    if len(head) >= MAX_HEADER_BYTES:
        raise InputError(f"{path}: header not terminated within {MAX_HEADER_BYTES} bytes")
    return fields, min(end, len(head))


def _data_name(value: str, path: Path, attached: str | None) -> str | None:
    if attached is not None and value.upper() == attached:
        return None
    if not value or len(value.split()) != 1 or "%" in value or value.upper() == "LIST":
        raise InputError(
            f"{path}: data file {value[:120]!r} refused: only one plain file name in the header's "
            "own folder is read (no list, pattern or path)"
        )
    if "/" in value or "\\" in value or value in (".", "..", path.name) or os.path.isabs(value):
        raise InputError(
            f"{path}: data file {value[:120]!r} refused: it must lie in the header's own folder "
            "(no folder part, no '..', no absolute path, not the header itself)"
        )
    return value


def parse_header(head: bytes, path: Path, *, nrrd: bool) -> HeaderFacts:
    """Facts of the NRRD (``nrrd``) or MetaImage header at the start of ``head``, the first
    bytes of ``path``.

    Raises:
        InputError: not a header of that kind, malformed fields, or a data file that is not one
            plain name in the header's folder.
    """
    if nrrd and not head.startswith(b"NRRD"):
        raise InputError(f"{path}: not a NRRD file (no 'NRRD' magic at the start)")
    fields, length = _split_header(head, path, nrrd)
    info = dict(fields)
    if nrrd:
        return _nrrd_facts(info, length, path)
    return _meta_facts(info, length, path)


def _nrrd_facts(info: dict[str, str], length: int, path: Path) -> HeaderFacts:
    if "sizes" not in info or "type" not in info:
        raise InputError(f"{path}: NRRD header lacks 'sizes' or 'type'")
    voxels = math.prod(_ints(info["sizes"], path, "sizes"))
    name_value = info.get("data file", info.get("datafile"))
    data = None if name_value is None else _data_name(name_value, path, None)
    encoding = info.get("encoding", "raw").lower()
    try:
        skip = int(info.get("byte skip", "0"))
    except ValueError:
        raise InputError(f"{path}: NRRD 'byte skip' is not an integer") from None
    kind = "raw" if encoding == "raw" else "text" if encoding in _NRRD_TEXT else "compressed"
    return HeaderFacts(length, data, voxels * _nrrd_itemsize(info["type"], path), kind, skip)


def _meta_facts(info: dict[str, str], length: int, path: Path) -> HeaderFacts:
    if "dimsize" not in info or "elementtype" not in info or "elementdatafile" not in info:
        raise InputError(f"{path}: MetaImage header lacks DimSize, ElementType or ElementDataFile")
    element = info["elementtype"].upper().removesuffix("_ARRAY")
    if element not in _MET_SIZES:
        raise InputError(f"{path}: unsupported MetaImage ElementType {info['elementtype'][:40]!r}")
    channels = _ints(info.get("elementnumberofchannels", "1"), path, "ElementNumberOfChannels")[0]
    voxels = math.prod(_ints(info["dimsize"], path, "DimSize")) * channels
    data = _data_name(info["elementdatafile"], path, "LOCAL")
    kind = "compressed" if info.get("compresseddata", "false").lower() in ("true", "1") else "raw"
    try:
        skip = int(info.get("headersize", "0"))
    except ValueError:
        raise InputError(f"{path}: MetaImage HeaderSize is not an integer") from None
    return HeaderFacts(length, data, voxels * _MET_SIZES[element], kind, skip)


def _data_path(header: Path, name: str) -> Path:
    """The data file beside ``header``; a link must stay in the same folder."""
    candidate = header.parent / name
    if candidate.is_symlink():
        real = Path(os.path.realpath(candidate))
        if real.parent != Path(os.path.realpath(header.parent)):
            raise InputError(f"{header}: data file {name!r} is a link out of the header's folder (to {real}); refused")
    return candidate


def _check_size(facts: HeaderFacts, size: int, where: Path) -> None:
    """The data must take what the header declares on disk (see :meth:`HeaderFacts.stored_range`)."""
    least, most = facts.stored_range()
    if size < least:
        raise InputError(
            f"{where}: holds {size} bytes of data, the header declares {least} (truncated, or not "
            "the data file of this header)"
        )
    if size > most:
        raise InputError(f"{where}: holds {size} bytes of data, more than the {most} the header allows; refused")


class _ZlibCheck:
    """Inflates a MetaImage's compressed data as it is copied, keeping only the count: ITK
    relabels garbage from a corrupt stream without a word."""

    def __init__(self, where: Path, skip: int, expected: int) -> None:
        self.where, self.skip, self.expected = where, skip, expected
        self.inflate = isal_zlib.decompressobj()
        self.count = 0

    def feed(self, chunk: bytes) -> None:
        cut = min(self.skip, len(chunk))
        self.skip -= cut
        data = chunk[cut:]
        try:
            while data and not self.inflate.eof:
                self.count += len(self.inflate.decompress(data, _COPY_CHUNK))
                data = self.inflate.unconsumed_tail
                if self.count > self.expected:
                    break
        # isal's stub declares `error: Exception` (an instance); at run time it is a class
        except isal_zlib.error as exc:  # type: ignore[misc]
            raise InputError(f"{self.where}: corrupt compressed data ({exc})") from None

    def close(self) -> None:
        if not self.inflate.eof or self.count != self.expected:
            raise InputError(
                f"{self.where}: corrupt or truncated compressed data (inflates to {self.count} "
                f"bytes{'' if self.inflate.eof else ' before its stream broke off'}, the header "
                f"declares {self.expected})"
            )


def _copy(fd: int, target: Path, check: _ZlibCheck | None = None) -> None:
    with os.fdopen(os.dup(fd), "rb") as src, open(target, "wb") as dst:
        src.seek(0)
        while chunk := src.read(_COPY_CHUNK):
            dst.write(chunk)
            if check is not None:
                check.feed(chunk)
    if check is not None:
        check.close()


@contextmanager
def staged_copy(path: Path, *, nrrd: bool) -> Iterator[Path]:
    """A private copy of the NRRD (``nrrd``) or MetaImage file ``path``, with its checked data
    file, for SimpleITK to read; removed on exit.

    Raises:
        InputError: see :func:`parse_header`, plus a data file that is missing, not a regular file,
            too short for the raw data the header declares, or a decoded size over the budget.
    """
    fd = open_regular(path)
    folder = None
    try:
        facts = parse_header(os.pread(fd, MAX_HEADER_BYTES, 0), path, nrrd=nrrd)
        check_bytes(path, facts.decoded_bytes, "the decoded image", share=DECODE_SHARE)
        if facts.data_file is None:
            _check_size(facts, os.fstat(fd).st_size - facts.header_bytes, path)
        folder = Path(tempfile.mkdtemp(prefix="atso-fast-read-"))
        attached_check = _check_for(facts, nrrd, path, facts.header_bytes) if facts.data_file is None else None
        _copy(fd, folder / path.name, attached_check)
        if facts.data_file is not None:
            _stage_data(path, facts, facts.data_file, folder, nrrd)
        yield folder / path.name
    finally:
        os.close(fd)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _check_for(facts: HeaderFacts, nrrd: bool, where: Path, offset: int) -> _ZlibCheck | None:
    if nrrd or facts.encoding != "compressed":
        return None  # NRRD's own reader reports a broken gzip stream
    return _ZlibCheck(where, offset + max(facts.skip, 0), facts.decoded_bytes)


def _stage_data(header: Path, facts: HeaderFacts, name: str, folder: Path, nrrd: bool) -> None:
    data = _data_path(header, name)
    try:
        fd = open_regular(data)
    except InputError as exc:  # name the header too: the user listed it, not its data file
        raise InputError(f"{header}: its data file {exc}") from None
    try:
        _check_size(facts, os.fstat(fd).st_size, data)
        _copy(fd, folder / name, _check_for(facts, nrrd, data, 0))
    finally:
        os.close(fd)
