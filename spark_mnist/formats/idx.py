"""IDX files: read and write, gzip-compressed or plain.  Pure numpy, no Spark; used anywhere (the driver, the
side tools, ``load_data``, the test kit).  See docs/concepts/inputs.md.

The format follows the spec on the MNIST page (LeCun, Cortes, Burges, "THE MNIST DATABASE of handwritten digits",
section "FILE FORMATS FOR THE MNIST DATABASE")::

    magic number   4 bytes: 0x00 0x00 <dtype code> <number of dimensions>
    dimensions     one big-endian uint32 per dimension
    data           prod(dimensions) items of the dtype, big-endian, C order

dtype codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64.

The reader streams: it never decompresses more than the header-declared payload plus one byte, so a gzip bomb or a
header that lies costs no more memory or time than a valid file of the declared size.
"""

import contextlib
import gzip
import hashlib
import io
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Union, cast

import numpy as np

from spark_mnist.errors import IdxFormatError, invalid
from spark_mnist.fs import replacing

__all__ = ["GZIP_MAGIC", "DTYPE_BY_CODE", "CODE_BY_KIND", "Source", "IdxHeader", "ParsedIdx", "IdxReader",
           "parse_idx", "encode_idx", "write_idx"]  # fmt: skip

GZIP_MAGIC = b"\x1f\x8b"
MAX_DIMENSIONS = 16
# A single IDX payload larger than this is treated as a lying header rather than data (64 GiB).
MAX_PAYLOAD_BYTES = 64 * 2**30
READ_CHUNK_BYTES = 4 * 2**20
# What trailing bytes in a gzip stream can be: reading on to tell these apart would decompress what a bomb holds.
GZIP_TRAILING = " (the gzip stream decompresses to more: appended data, a header that lies, or corrupt compressed data)"

# dtype code -> big-endian numpy dtype, from the IDX spec.
DTYPE_BY_CODE: dict[int, np.dtype] = {
    code: np.dtype(f">{t}")
    for code, t in ((0x08, "u1"), (0x09, "i1"), (0x0B, "i2"), (0x0C, "i4"), (0x0D, "f4"), (0x0E, "f8"))
}
CODE_BY_KIND = {(dt.kind, dt.itemsize): code for code, dt in DTYPE_BY_CODE.items()}

Source = Union[bytes, bytearray, memoryview, str, os.PathLike]


class IdxHeader(NamedTuple):
    """The header of an IDX file: element dtype (big-endian, as stored) and shape."""

    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def payload_bytes(self) -> int:
        """Size of the data section, in bytes."""
        # Python ints: numpy's int64 product silently wraps for absurd headers (e.g. three dimensions of 2**32 - 1).
        return math.prod(self.shape) * self.dtype.itemsize

    def encode(self) -> bytes:
        """The header as stored in the file."""
        code = CODE_BY_KIND[(self.dtype.kind, self.dtype.itemsize)]
        return bytes([0, 0, code, len(self.shape)]) + struct.pack(f">{len(self.shape)}I", *self.shape)

    def __str__(self) -> str:
        """How errors describe the header: ``shape (60000, 28, 28) of uint8 declares 47040000 data bytes``."""
        return f"shape {self.shape} of {self.dtype.name} declares {self.payload_bytes} data bytes"


class ParsedIdx(NamedTuple):
    """An IDX file read into memory.

    ``array`` is native-endian with the header's shape; ``sha256`` is the hex digest of the decompressed file
    (header and data, the "payload" of published checksums); ``payload_bytes`` its size in bytes.
    """

    array: np.ndarray
    sha256: str
    payload_bytes: int


def _read_header(stream: BinaryIO, name: str, max_payload_bytes: int) -> IdxHeader:
    """Read and check the IDX magic number and dimensions from ``stream`` (already decompressed), as the spec on
    the MNIST page lays them out (see the module docstring).

    Raises:
        IdxFormatError: wrong magic number, unknown dtype code, zero or absurd dimensions, or a header cut short.
    """
    magic = _guarded_read(stream, 4, name, exact="the 4-byte magic number")
    if magic[:2] != b"\x00\x00":
        head = magic
        with contextlib.suppress(IdxFormatError):  # only to say what the file looks like
            head += _guarded_read(stream, 252, name)
        head = head.lstrip().lower()
        kind = ", which looks like text, not binary IDX data" if head[:1] in (b"<", b"{", b"[") else ""
        if head.startswith((b"<!doctype html", b"<?xml", b"<head", b"<body")) or b"<html" in head:
            kind = ", which looks like an HTML page (a mirror's error or login page saved under the file's name?)"
        found = f"found {magic.hex(' ')}{kind}"
        raise IdxFormatError(f"{name}: wrong magic number: expected 00 00 <dtype code> <ndim>, {found}")
    code, ndim = magic[2], magic[3]
    if code not in DTYPE_BY_CODE:
        known = ", ".join(f"0x{c:02X}" for c in DTYPE_BY_CODE)
        raise IdxFormatError(f"{name}: unknown IDX dtype code 0x{code:02X}: expected one of {known}")
    if not 1 <= ndim <= MAX_DIMENSIONS:
        raise IdxFormatError(f"{name}: absurd number of dimensions {ndim}: expected 1 to {MAX_DIMENSIONS}")
    dims = struct.unpack(f">{ndim}I", _guarded_read(stream, 4 * ndim, name, exact=f"{ndim} dimension sizes"))
    if 0 in dims:
        raise IdxFormatError(f"{name}: zero dimension in shape {dims}: every dimension must be at least 1")
    header = IdxHeader(DTYPE_BY_CODE[code], dims)
    if header.payload_bytes > max_payload_bytes:
        raise IdxFormatError(f"{name}: absurd dimensions: {header}, more than the limit of {max_payload_bytes} bytes")
    return header


def _guarded_read(stream: BinaryIO, size: int | memoryview, name: str, exact: str | None = None) -> Any:
    """``stream.read(size)``, or ``stream.readinto(size)`` for a buffer; a corrupt gzip stream as IdxFormatError.
    With ``exact`` (what the bytes are, for the message), fewer than ``size`` bytes are a truncated file."""
    try:
        data = stream.read(size) if isinstance(size, int) else stream.readinto(size)  # type: ignore[attr-defined]  # BinaryIO's stub lacks readinto
    except (OSError, EOFError, zlib.error) as e:
        raise IdxFormatError(f"{name}: corrupt or truncated gzip stream: {e}") from e
    if exact is not None and len(data) != size:
        raise IdxFormatError(f"{name}: truncated: expected {exact} ({size} bytes), found {len(data)} bytes")
    return data


class IdxReader(contextlib.AbstractContextManager["IdxReader"]):
    """A streaming IDX reader: the header on opening, then the data in blocks of rows, hashed as it goes.

    Use as a context manager (it closes the file)::

        with IdxReader(path_or_bytes) as reader:
            reader.header.shape          # from the header, before any data is decompressed
            block = reader.read(rows)    # a native-endian array of the next rows, as often as wanted
            reader.finish()              # every row read: checks the end of the file
            reader.sha256                # of the whole decompressed payload

    ``name`` is how errors name the file, ``header`` the :class:`IdxHeader`, ``payload_bytes`` the size of the
    decompressed file, header included, in bytes; ``sha256`` its hex digest, set by :meth:`finish`.  Memory is
    bounded by one block; nothing past the header-declared size plus one byte is decompressed.

    Raises (on opening or while reading):
        IdxFormatError: empty file, non-IDX content (e.g. an HTML page), wrong magic number, unknown dtype code,
            zero or absurd dimensions, truncated payload, trailing bytes, corrupt or truncated gzip stream.
    """

    def __init__(self, source: Source, name: str | None = None, *, max_payload_bytes: int = MAX_PAYLOAD_BYTES):
        self._rows_read = 0
        raw: BinaryIO
        with contextlib.ExitStack() as stack:  # closes what was opened when a check fails
            if isinstance(source, (bytes, bytearray, memoryview)):
                self.name, raw = name or "<bytes>", io.BytesIO(bytes(source))
            else:
                self.name = name or str(Path(source))
                try:
                    raw = stack.enter_context(open(source, "rb"))
                except OSError as e:  # not found, a directory, no permission, ...
                    what = "file not found" if isinstance(e, FileNotFoundError) else f"cannot open: {e.strerror or e}"
                    raise IdxFormatError(f"{self.name}: {what}") from e
            self._gzipped = raw.read(2) == GZIP_MAGIC
            size = raw.seek(0, io.SEEK_END)
            raw.seek(0)
            if not size:
                raise IdxFormatError(f"{self.name}: empty file (0 bytes); expected a gzip-compressed or plain IDX file")
            self._stream = cast(BinaryIO, stack.enter_context(gzip.GzipFile(fileobj=raw))) if self._gzipped else raw
            self.header = _read_header(self._stream, self.name, max_payload_bytes)
            encoded = self.header.encode()
            self.payload_bytes = len(encoded) + self.header.payload_bytes
            if not self._gzipped and size < self.payload_bytes:
                # Uncompressed input: the size is known, so a lying header fails before any allocation.
                raise IdxFormatError(f"{self.name}: truncated payload: {self.header}, found {size - len(encoded)}")
            self._stack = stack.pop_all()
        self._digest = hashlib.sha256(encoded, usedforsecurity=False)

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def read(self, rows: int) -> np.ndarray:
        """The next ``rows`` rows (first dimension) as a native-endian array.

        Raises:
            ValueError: ``rows`` below 0 or past the end the header declares.
            IdxFormatError: a truncated payload, a header declaring more than this machine can allocate, or a
                corrupt gzip stream.
        """
        header, left = self.header, self.header.shape[0] - self._rows_read
        if not 0 <= rows <= left:
            raise invalid("rows", rows, f"0 to the {left} rows left")
        row_bytes = math.prod(header.shape[1:]) * header.dtype.itemsize
        try:
            buffer = np.empty(rows * row_bytes, dtype=np.uint8)
        except MemoryError as e:
            raise IdxFormatError(
                f"{self.name}: {header}, more than this machine can allocate ({rows * row_bytes} bytes needed); a "
                f"lying header or a file too large"
            ) from e
        filled = 0
        while filled < len(buffer):
            if not (got := _guarded_read(self._stream, buffer.data[filled : filled + READ_CHUNK_BYTES], self.name)):
                found = self._rows_read * row_bytes + filled
                raise IdxFormatError(f"{self.name}: truncated payload: {header}, found {found}")
            filled += got
        self._digest.update(buffer.data)
        self._rows_read += rows
        # astype converts big-endian to native on any platform (byteswap + view would be wrong on big-endian
        # hosts); for one-byte dtypes it is a view, no copy.
        array = buffer.view(header.dtype).reshape((rows, *header.shape[1:]))
        return array.astype(header.dtype.newbyteorder("="), copy=False)

    def finish(self) -> None:
        """Check the end of the file (no trailing bytes; the gzip CRC) once every row was read.

        Raises:
            ValueError: rows left unread.
            IdxFormatError: trailing bytes or a corrupt gzip stream.
        """
        if self._rows_read != self.header.shape[0]:
            raise ValueError(f"{self.name}: {self.header.shape[0] - self._rows_read} rows left unread")
        if _guarded_read(self._stream, 1, self.name):
            trailing = GZIP_TRAILING if self._gzipped else ""
            raise IdxFormatError(f"{self.name}: trailing bytes after the data ({self.header}){trailing}")
        self.sha256 = self._digest.hexdigest()


def parse_idx(source: Source, name: str | None = None, *, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> ParsedIdx:
    """Parse one IDX file, gzip-compressed or plain, into a native-endian numpy array.

    Args:
        source: the file's bytes (as read by Spark's ``binaryFile`` source) or a local path.
        name: how errors name the file; defaults to the path.
        max_payload_bytes: headers declaring more data than this are rejected before anything is decompressed.

    Returns:
        :class:`ParsedIdx` with the array (shape from the header, dtype per the header's dtype code, native byte
        order), the sha256 of the decompressed payload and its size in bytes.

    Raises:
        IdxFormatError: empty file, non-IDX content (e.g. an HTML page), wrong magic number, unknown dtype code, zero
            or absurd dimensions, truncated payload, trailing bytes, corrupt or truncated gzip stream.
    """
    with IdxReader(source, name, max_payload_bytes=max_payload_bytes) as reader:
        array = reader.read(reader.header.shape[0])
        reader.finish()
        return ParsedIdx(array, reader.sha256, reader.payload_bytes)


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX encoding (uncompressed) of ``array``: header then big-endian data.

    Raises:
        ValueError: a dtype the IDX spec has no code for, or a shape :func:`parse_idx` would reject (0-d, more than
            16 dimensions, a zero dimension, a dimension over 2**32 - 1).
    """
    if (array.dtype.kind, array.dtype.itemsize) not in CODE_BY_KIND:
        raise invalid("dtype", array.dtype.name, "one IDX stores: uint8, int8, int16, int32, float32, float64")
    if not 1 <= array.ndim <= MAX_DIMENSIONS:
        must = f"1 to {MAX_DIMENSIONS} dimensions (IDX has no 0-d arrays), not {array.ndim} dimensions"
        raise invalid("shape", array.shape, must)
    if not all(1 <= d <= 0xFFFFFFFF for d in array.shape):
        raise invalid("shape", array.shape, "dimensions of 1 to 2**32 - 1 each")
    header = IdxHeader(array.dtype.newbyteorder(">"), array.shape)
    return header.encode() + np.ascontiguousarray(array, dtype=header.dtype).tobytes()


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file, gzip-compressed when ``compress`` is true or the name ends in ``.gz``.

    The file appears under its final name only when complete (:func:`spark_mnist.fs.replacing`).

    Returns:
        The path written.
    Raises:
        ValueError: as :func:`encode_idx`.
    """
    path, data = Path(path), encode_idx(array)
    if path.suffix == ".gz" if compress is None else compress:
        data = gzip.compress(data, compresslevel=6, mtime=0)
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return path
