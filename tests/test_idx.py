"""IDX reading and writing (spark_mnist.formats.idx): round trips, every defect as an IdxFormatError, gzip bombs, real data.

Pure numpy, no Spark.  The IDX spec is the one on the MNIST page (LeCun, Cortes, Burges): magic 00 00 <dtype code>
<ndim>, one big-endian uint32 per dimension, then big-endian data in C order.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import spark_mnist.formats.idx as idx
from spark_mnist.datasets import get_dataset
from spark_mnist.errors import IdxFormatError, InputError
from spark_mnist.formats.idx import (
    DTYPE_BY_CODE,
    IdxHeader,
    IdxReader,
    ParsedIdx,
    encode_idx,
    parse_idx,
    write_idx,
)


def read_idx(source, name=None, **kwargs):
    """The array :func:`parse_idx` reads."""
    return parse_idx(source, name, **kwargs).array


MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# dtype code -> native numpy dtype, as the IDX spec on the MNIST page lists them.
NATIVE_BY_CODE = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(np.int16),
    0x0C: np.dtype(np.int32),
    0x0D: np.dtype(np.float32),
    0x0E: np.dtype(np.float64),
}
CODES = sorted(NATIVE_BY_CODE)


# ----------------------------------------------------------------------------------------------------------------
# helpers


def header_bytes(code: int, shape: tuple[int, ...]) -> bytes:
    """An IDX header written by hand (not by the code under test)."""
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


def sample_array(code: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Values spanning each dtype's range, extremes included."""
    dtype = NATIVE_BY_CODE[code]
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        flat = rng.integers(info.min, info.max, size=size, endpoint=True, dtype=dtype)
        extremes = np.array([info.min, info.max, 0, 1], dtype=dtype)
    else:
        flat = (rng.standard_normal(size) * 1e3).astype(dtype)
        info = np.finfo(dtype)
        extremes = np.array([info.min, info.max, info.tiny, -0.0, np.inf, -np.inf], dtype=dtype)
    flat[: min(size, len(extremes))] = extremes[: min(size, len(extremes))]
    return flat.reshape(shape)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shape, dtype (in native order) and bit patterns, so NaN payloads and -0.0 count."""
    if a.shape != b.shape or a.dtype.newbyteorder("=") != b.dtype.newbyteorder("="):
        return False
    native = a.dtype.newbyteorder("=")
    ints = np.dtype(f"u{a.dtype.itemsize}")
    return np.array_equal(np.ascontiguousarray(a, dtype=native).view(ints),
                          np.ascontiguousarray(b, dtype=native).view(ints))


def raises_for(name: str, what: str):
    """pytest.raises for an IdxFormatError whose message names the file and says ``what`` (a regex)."""
    return pytest.raises(IdxFormatError, match=rf"(?s)^{re.escape(name)}: .*{what}")


def reader_chunks(source, rows_per_chunk: int, name: str | None = None, **kwargs):
    """``IdxReader(source).read`` of at most ``rows_per_chunk`` rows until the end, then ``finish()``, streamed, the
    reader closed at the end."""
    with IdxReader(source, name, **kwargs) as reader:
        for start in range(0, reader.header.shape[0], rows_per_chunk):
            yield reader.read(min(rows_per_chunk, reader.header.shape[0] - start))
        reader.finish()


def write_raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


@pytest.fixture(params=["plain", "gz"])
def container(request):
    """Parametrise a test over plain and gzip-compressed files: (suffix, wrap bytes)."""
    if request.param == "gz":
        return ".gz", gz
    return "", lambda data: data


# ----------------------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("code", CODES, ids=lambda c: f"0x{c:02X}")
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (4, 3, 2), (2, 3, 1, 4), (1, 1, 1, 1, 2)], ids=str)
def test_round_trip_every_dtype_and_rank(tmp_path, container, code, shape):
    suffix, _ = container
    array = sample_array(code, shape)
    path = write_idx(tmp_path / f"a-idx{len(shape)}{suffix}", array)
    assert path.exists()
    assert path.read_bytes()[:2] == (b"\x1f\x8b" if suffix else b"\x00\x00")

    parsed = parse_idx(path)
    assert isinstance(parsed, ParsedIdx)
    assert parsed.array.shape == shape
    assert parsed.array.dtype == NATIVE_BY_CODE[code]
    assert parsed.array.dtype.isnative
    assert same_bits(parsed.array, array)
    encoded = encode_idx(array)
    assert parsed.payload_bytes == len(encoded) == 4 + 4 * len(shape) + array.nbytes
    assert parsed.sha256 == hashlib.sha256(encoded).hexdigest()

    assert same_bits(read_idx(path), array)
    assert same_bits(read_idx(str(path)), array)
    # bytes in memory (what Spark's binaryFile source hands over) parse the same
    assert same_bits(parse_idx(path.read_bytes(), name="x").array, array)


@pytest.mark.parametrize("code", CODES, ids=lambda c: f"0x{c:02X}")
def test_encode_idx_matches_the_spec_byte_for_byte(code):
    array = sample_array(code, (2, 3))
    dtype = DTYPE_BY_CODE[code]
    assert dtype.itemsize == NATIVE_BY_CODE[code].itemsize
    assert dtype.byteorder in (">", "|")
    expected = header_bytes(code, (2, 3)) + array.astype(dtype.newbyteorder(">")).tobytes()
    assert encode_idx(array) == expected
    # big-endian input encodes identically
    assert encode_idx(array.astype(array.dtype.newbyteorder(">"))) == expected
    # non-contiguous input encodes in logical C order
    assert encode_idx(np.asfortranarray(array)) == expected
    assert encode_idx(array.T.T) == expected


def test_known_bytes_parse_to_known_values():
    data = header_bytes(0x0B, (3,)) + struct.pack(">3h", -2, 258, 32767)
    assert read_idx(data).tolist() == [-2, 258, 32767]
    data = header_bytes(0x0D, (2,)) + struct.pack(">2f", 1.5, -0.25)
    assert read_idx(data).tolist() == [1.5, -0.25]
    data = header_bytes(0x0C, (1, 2)) + struct.pack(">2i", -(2**31), 2**31 - 1)
    assert read_idx(data).tolist() == [[-(2**31), 2**31 - 1]]
    data = header_bytes(0x09, (2,)) + bytes([0xFF, 0x7F])
    assert read_idx(data).tolist() == [-1, 127]


def test_parsed_array_is_writable_and_independent_of_the_source():
    data = bytearray(encode_idx(np.arange(6, dtype=np.uint8)))
    array = read_idx(data)
    array[0] = 42  # writable
    data[-1] = 0  # mutating the source afterwards does not change the array
    assert array.tolist() == [42, 1, 2, 3, 4, 5]


def test_write_idx_compression_follows_suffix_or_flag(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert write_idx(tmp_path / "a.gz", array).read_bytes()[:2] == b"\x1f\x8b"
    assert write_idx(tmp_path / "a", array).read_bytes() == encode_idx(array)
    assert write_idx(tmp_path / "b", array, compress=True).read_bytes()[:2] == b"\x1f\x8b"
    assert write_idx(tmp_path / "b.gz", array, compress=False).read_bytes() == encode_idx(array)
    # deterministic (mtime=0): the same array gives the same gz bytes
    assert write_idx(tmp_path / "c.gz", array).read_bytes() == (tmp_path / "a.gz").read_bytes()
    # complete files only, no temporaries left behind; overwriting works
    write_idx(tmp_path / "a.gz", array[:1])
    assert read_idx(tmp_path / "a.gz").shape == (1, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.gz", "b", "b.gz", "c.gz"]


@pytest.mark.parametrize("bad", [
    np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.uint16), np.zeros(3, dtype=np.float16),
    np.zeros(3, dtype=bool), np.zeros(3, dtype=np.complex64), np.array(["a"]),
], ids=lambda a: str(a.dtype))
def test_encode_idx_rejects_dtypes_without_an_idx_code(bad):
    with pytest.raises(ValueError, match="Invalid dtype"):
        encode_idx(bad)


@pytest.mark.parametrize("bad, what", [
    (np.uint8(3), "0-d"),
    (np.zeros((0,), dtype=np.uint8), "Invalid shape"),
    (np.zeros((2, 0, 3), dtype=np.uint8), "Invalid shape"),
    (np.zeros((1,) * 17, dtype=np.uint8), "17 dimensions"),
], ids=["0-d", "empty", "zero-dim", "17-dims"])
def test_encode_idx_rejects_shapes_the_reader_would_reject(tmp_path, bad, what):
    with pytest.raises(ValueError, match=what):
        encode_idx(bad)
    with pytest.raises(ValueError, match=what):
        write_idx(tmp_path / "x.gz", bad)
    assert list(tmp_path.iterdir()) == []


def test_sixteen_dimensions_round_trip():
    array = np.arange(2, dtype=np.int16).reshape((1,) * 15 + (2,))
    assert same_bits(read_idx(encode_idx(array)), array)


def test_header_dataclass():
    header = IdxHeader(DTYPE_BY_CODE[0x08], (60000, 28, 28))
    assert header.payload_bytes == 47_040_000
    assert header.encode() == header_bytes(0x08, (60000, 28, 28))
    # no int64 wrap-around for absurd shapes
    assert IdxHeader(DTYPE_BY_CODE[0x0E], (2**32 - 1,) * 3).payload_bytes == (2**32 - 1) ** 3 * 8


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 4, 10, 1000])
def test_reader_chunks(tmp_path, container, rows_per_chunk):
    suffix, _ = container
    array = sample_array(0x0B, (10, 3, 2))
    path = write_idx(tmp_path / f"a{suffix}", array)
    chunks = list(reader_chunks(path, rows_per_chunk))
    assert len(chunks) == -(-10 // rows_per_chunk)
    assert all(len(c) <= rows_per_chunk and c.shape[1:] == (3, 2) for c in chunks)
    assert all(c.dtype == np.int16 and c.dtype.isnative for c in chunks)
    assert same_bits(np.concatenate(chunks), array)
    # bytes sources and 1-d files too
    labels = np.arange(7, dtype=np.uint8)
    assert np.concatenate(list(reader_chunks(encode_idx(labels), 2))).tolist() == labels.tolist()


def test_reader_read_rejects_rows_out_of_bounds_and_finish_rows_left():
    with IdxReader(encode_idx(np.zeros(2, np.uint8))) as reader:
        for bad in (-1, 3):
            with pytest.raises(ValueError, match=rf"Invalid rows: {bad}. Must be 0 to the 2 rows left"):
                reader.read(bad)
        reader.read(1)
        with pytest.raises(ValueError, match="1 rows left unread"):
            reader.finish()


def test_reader_chunks_reports_defects_after_the_good_rows():
    data = encode_idx(np.zeros((4, 2), np.uint8))
    chunks = reader_chunks(data + b"\x00", 2, name="t.idx")
    assert next(chunks).shape == (2, 2)
    assert next(chunks).shape == (2, 2)
    with raises_for("t.idx", "trailing bytes"):
        next(chunks)
    chunks = reader_chunks(gz(data[:-3]), 2, name="t.gz")
    assert next(chunks).shape == (2, 2)
    with raises_for("t.gz", "truncated payload"):
        next(chunks)
    with raises_for("t.gz", "wrong magic number"):
        next(reader_chunks(b"PK\x03\x04", 1, name="t.gz"))


# ----------------------------------------------------------------------------------------------------------------
# property: random arrays of every dtype and rank 1..4 round-trip


def _idx_arrays():
    def for_dtype(dtype):
        if dtype.kind == "f":
            elements = st.floats(width=8 * dtype.itemsize, allow_nan=True, allow_infinity=True,
                                 allow_subnormal=True)
        else:
            elements = None
        return arrays(dtype, array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6), elements=elements)

    byte_orders = st.sampled_from(["=", ">", "<"])
    dtypes = st.builds(lambda code, order: NATIVE_BY_CODE[code].newbyteorder(order),
                       st.sampled_from(CODES), byte_orders)
    return dtypes.flatmap(for_dtype)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(array=_idx_arrays(), compress=st.booleans(), rows_per_chunk=st.integers(1, 7))
def test_property_round_trip(tmp_path, array, compress, rows_per_chunk):
    path = write_idx(tmp_path / ("p.gz" if compress else "p"), array)
    encoded = encode_idx(array)
    assert len(encoded) == 4 + 4 * array.ndim + array.nbytes

    parsed = parse_idx(path)
    assert parsed.array.dtype.isnative
    assert same_bits(parsed.array, array)
    assert parsed.sha256 == hashlib.sha256(encoded).hexdigest()
    assert parsed.payload_bytes == len(encoded)

    from_bytes = parse_idx(path.read_bytes())
    assert same_bits(from_bytes.array, array) and from_bytes.sha256 == parsed.sha256

    chunks = list(reader_chunks(path, rows_per_chunk))
    assert all(1 <= len(c) <= rows_per_chunk for c in chunks)
    assert same_bits(np.concatenate(chunks), array)


# ----------------------------------------------------------------------------------------------------------------
# defects: each one an IdxFormatError (a ValueError) naming the file and saying what is wrong


def test_idx_format_error_is_an_input_error_and_a_value_error():
    assert issubclass(IdxFormatError, InputError)
    assert issubclass(IdxFormatError, ValueError)


GOOD = encode_idx(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))

DEFECTS = {
    "wrong magic": (b"\x01\x02\x08\x03" + GOOD[4:], r"wrong magic number.*found 01 02 08 03"),
    "wrong magic (zip)": (b"PK\x03\x04" + bytes(40), r"wrong magic number.*50 4b 03 04"),
    "unknown dtype code": (header_bytes(0x0A, (2,)) + bytes(2), r"unknown IDX dtype code 0x0A.*0x08"),
    "unknown dtype code 0xFF": (header_bytes(0xFF, (2,)) + bytes(2), r"unknown IDX dtype code 0xFF"),
    "zero dimension": (header_bytes(0x08, (3, 0, 2)), r"zero dimension in shape \(3, 0, 2\)"),
    "zero rank": (bytes([0, 0, 8, 0]), r"absurd number of dimensions 0"),
    "too many dims": (bytes([0, 0, 8, 200]) + bytes(800), r"absurd number of dimensions 200"),
    "absurd dimensions": (header_bytes(0x0E, (2**32 - 1,) * 3), r"absurd dimensions: .*more than the limit"),
    "absurd (int64 wrap)": (header_bytes(0x08, (2**31, 2**31, 4)), r"absurd dimensions: .*18446744073709551616"),
    "truncated payload": (GOOD[:-1], r"truncated payload: shape \(2, 3, 4\).*declares 24 data bytes, found 23"),
    "no payload": (GOOD[:16], r"truncated payload.*found 0"),
    "trailing bytes": (GOOD + b"\x00", r"trailing bytes after the data \(shape \(2, 3, 4\).*24 data bytes\)"),
    "two files glued": (GOOD + GOOD, r"trailing bytes"),
    "header cut in magic": (b"\x00\x00\x08", r"truncated: expected the 4-byte magic number \(4 bytes\), found 3"),
    "header cut in dims": (GOOD[:10], r"truncated: expected 3 dimension sizes \(12 bytes\), found 6 bytes"),
    "html page": (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>nope</body></html>",
                  r"wrong magic number.*HTML page"),
    "html page, whitespace first": (b"\r\n  <html><body>Access denied</body></html>", r"HTML page"),
    "json error": (b'{"error": "AccessDenied"}', r"wrong magic number.*text, not binary IDX"),
}


@pytest.mark.parametrize("data, what", DEFECTS.values(), ids=DEFECTS.keys())
def test_defects_raise_idx_format_error(tmp_path, container, data, what):
    suffix, wrap = container
    path = write_raw(tmp_path / f"train-images-idx3-ubyte{suffix}", wrap(data))
    with raises_for(str(path), what):
        parse_idx(path)
    with raises_for("s3://bucket/x.gz", what):
        parse_idx(path.read_bytes(), name="s3://bucket/x.gz")
    with raises_for(str(path), what):
        list(reader_chunks(path, 1))


def test_absurd_dimensions_follow_max_payload_bytes(tmp_path):
    path = write_raw(tmp_path / "a.idx", header_bytes(0x0C, (1000, 1000)))
    with raises_for(str(path), r"absurd dimensions: shape \(1000, 1000\).*4000000 data bytes.*limit of 1000000 bytes"):
        parse_idx(path, max_payload_bytes=1_000_000)
    with raises_for(str(path), "absurd dimensions"):
        list(reader_chunks(path, 10, max_payload_bytes=1_000_000))
    # exactly at the limit is fine
    ok = write_raw(tmp_path / "b.idx", encode_idx(np.zeros(10, np.int32)))
    assert parse_idx(ok, max_payload_bytes=40).array.shape == (10,)
    with raises_for(str(ok), "absurd dimensions"):
        parse_idx(ok, max_payload_bytes=39)


@pytest.mark.parametrize("data", [b"", gz(b"")], ids=["empty", "gzip of nothing"])
def test_empty_file(tmp_path, data):
    path = write_raw(tmp_path / "t10k-labels-idx1-ubyte.gz", data)
    what = "empty file" if not data else r"truncated: expected the 4-byte magic number.*found 0 bytes"
    with raises_for(str(path), what):
        parse_idx(path)


def test_missing_file_and_directory(tmp_path):
    with raises_for(str(tmp_path / "nope.gz"), "file not found"):
        parse_idx(tmp_path / "nope.gz")
    with raises_for(str(tmp_path), "cannot open"):
        parse_idx(tmp_path)


def _corruptible_gz() -> bytes:
    """A gz with plenty of Huffman-coded deflate data (compressible but not trivially so)."""
    rng = np.random.default_rng(7)
    array = (rng.integers(0, 4, size=(40, 28, 28)) * 60).astype(np.uint8)
    return gz(encode_idx(array))


@pytest.mark.parametrize("fraction", [0.25, 0.4, 0.5, 0.6, 0.75])
def test_corrupt_gzip_stream(tmp_path, fraction):
    data = bytearray(_corruptible_gz())
    assert len(data) > 1000
    offset = 10 + int((len(data) - 18) * fraction)  # inside the deflate data: after the header, before the trailer
    data[offset:offset + 8] = bytes(b ^ 0xA5 for b in data[offset:offset + 8])
    path = write_raw(tmp_path / "corrupt.gz", bytes(data))
    # Corrupt deflate data fails to decode, fails the CRC, or (when it happens to decode to more bytes) shows up as
    # trailing bytes, whose message then names corruption as a cause: reading on would defeat the bomb guard.
    what = "corrupt or truncated gzip stream|trailing bytes.*corrupt compressed data"
    with raises_for(str(path), what):
        parse_idx(path)
    with raises_for(str(path), what):
        list(reader_chunks(path, 7))


def test_corrupt_gzip_stored_block_fails_the_crc(tmp_path):
    """Incompressible data is stored verbatim; flipping it keeps the deflate structure valid but breaks the CRC."""
    array = np.random.default_rng(0).integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    data = bytearray(gz(encode_idx(array)))
    data[len(data) // 2] ^= 0xFF
    path = write_raw(tmp_path / "crc.gz", bytes(data))
    with raises_for(str(path), "corrupt or truncated gzip stream.*CRC"):
        parse_idx(path)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, -8, -1], ids=["10%", "50%", "90%", "no trailer", "last byte"])
def test_truncated_gzip_stream(tmp_path, keep):
    data = _corruptible_gz()
    cut = data[:keep] if isinstance(keep, int) else data[:int(len(data) * keep)]
    path = write_raw(tmp_path / "cut.gz", cut)
    with raises_for(str(path), "corrupt or truncated gzip stream"):
        parse_idx(path)


@pytest.mark.parametrize("data", [b"\x1f\x8b", b"\x1f\x8b\x08\x00\x00"], ids=["magic only", "header cut"])
def test_gzip_header_cut_short(tmp_path, data):
    path = write_raw(tmp_path / "h.gz", data)
    with raises_for(str(path), "corrupt or truncated gzip stream"):
        parse_idx(path)


def test_garbage_after_the_gzip_member(tmp_path):
    path = write_raw(tmp_path / "g.gz", gz(GOOD) + b"<html>")
    with raises_for(str(path), "corrupt or truncated gzip stream"):
        parse_idx(path)


def test_concatenated_gzip_members_are_one_stream():
    """gzip allows several members; their concatenated contents are the file (as gunzip sees it)."""
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    data = gz(GOOD[:7]) + gz(GOOD[7:20]) + gz(GOOD[20:])
    parsed = parse_idx(data)
    assert np.array_equal(parsed.array, array)
    assert parsed.sha256 == hashlib.sha256(GOOD).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# gzip bombs and lying headers


class _CountingReader:
    """A binary file wrapper that counts the compressed bytes read through it."""

    def __init__(self, raw):
        self.raw, self.read_bytes = raw, 0
        self.mode = "rb"

    def read(self, size=-1):
        data = self.raw.read(size)
        self.read_bytes += len(data)
        return data

    def __getattr__(self, attr):
        return getattr(self.raw, attr)


@pytest.fixture
def gzip_probe(monkeypatch):
    """Count what the parser takes out of every gzip stream it opens and the compressed bytes that costs."""
    opened = []

    class CountingGzipFile(gzip.GzipFile):
        def __init__(self, *args, fileobj=None, **kwargs):
            self.counter = _CountingReader(fileobj)
            self.returned = 0
            super().__init__(*args, fileobj=self.counter, **kwargs)
            opened.append(self)

        def read(self, size=-1):
            assert size is not None and size >= 0, "the parser must never read a gzip stream to its end"
            data = super().read(size)
            self.returned += len(data)
            return data

        def read1(self, size=-1):
            assert size is not None and size >= 0, "the parser must never read a gzip stream to its end"
            data = super().read1(size)
            self.returned += len(data)
            return data

    monkeypatch.setattr(gzip, "GzipFile", CountingGzipFile)
    return opened


def _bomb(declared: np.ndarray, extra_mib: int) -> bytes:
    """A valid gz of ``declared``'s IDX file followed by ``extra_mib`` MiB of zeros, made cheaply from repeated members."""
    member = gzip.compress(bytes(2**20 * 8), compresslevel=9, mtime=0)
    return gz(encode_idx(declared)) + member * (extra_mib // 8)


def test_gzip_bomb_stops_after_the_declared_bytes(tmp_path, gzip_probe):
    declared = np.arange(10, dtype=np.uint8)  # header says 10 bytes of data...
    data = _bomb(declared, extra_mib=1024)  # ...the stream holds 1 GiB more
    assert len(data) < 2 * 2**20
    path = write_raw(tmp_path / "bomb.gz", data)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with raises_for(str(path), r"trailing bytes after the data \(shape \(10,\) of uint8 declares 10 data bytes\)"):
            parse_idx(path)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0, f"took {elapsed:.2f}s: the parser decompressed far more than declared"
    assert peak < 8 * 2**20, f"peak {peak} bytes traced"
    (stream,) = gzip_probe
    declared_total = len(encode_idx(declared))
    assert stream.returned <= declared_total + 1
    # and it read only a sliver of the compressed file
    assert stream.counter.read_bytes <= 512 * 2**10 < len(data)


def test_gzip_bomb_50mb_from_the_brief(tmp_path, gzip_probe):
    """Header declares 10 data bytes; the payload is 50 MB of zeros compressed to ~50 KB."""
    data = gzip.compress(encode_idx(np.zeros(10, np.uint8)) + bytes(50_000_000), compresslevel=9, mtime=0)
    assert len(data) < 100_000
    path = write_raw(tmp_path / "bomb.gz", data)
    start = time.perf_counter()
    with raises_for(str(path), "trailing bytes"):
        parse_idx(path)
    assert time.perf_counter() - start < 1.0
    with raises_for(str(path), "trailing bytes"):
        list(reader_chunks(path, 3))
    assert len(gzip_probe) == 2
    assert all(s.returned <= len(encode_idx(np.zeros(10, np.uint8))) + 1 for s in gzip_probe)


def test_parser_reads_exactly_declared_plus_one_from_a_valid_gzip(gzip_probe):
    array = np.arange(3000, dtype=np.int16).reshape(30, 100)
    parse_idx(gz(encode_idx(array)))
    (stream,) = gzip_probe
    assert stream.returned == len(encode_idx(array))  # the extra 1-byte read found the end: 0 bytes


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return None


def test_lying_header_with_tiny_gzip_body_fails_fast_without_touching_memory(tmp_path, monkeypatch):
    """Header declares 1 GiB; the body is 100 bytes.  Untouched np.empty pages are fine, touched ones are not."""
    path = write_raw(tmp_path / "liar.gz", gz(header_bytes(0x08, (1024, 1024, 1024)) + bytes(100)))
    rss_during = []
    real_read = idx._guarded_read

    def probing_read(stream, size, name, exact=None):
        if not isinstance(size, int):  # a readinto of the data
            rss_during.append(_rss_bytes())
        return real_read(stream, size, name, exact)

    monkeypatch.setattr(idx, "_guarded_read", probing_read)
    before = _rss_bytes()
    start = time.perf_counter()
    with raises_for(str(path), r"truncated payload: shape \(1024, 1024, 1024\).*1073741824 data bytes, found 100"):
        parse_idx(path)
    assert time.perf_counter() - start < 1.0
    if before is not None and rss_during and rss_during[0] is not None:
        assert max(rss_during) - before < 64 * 2**20, "the parser touched memory for data it never received"


def test_lying_header_60000x28x28_with_tiny_body(tmp_path, container):
    suffix, wrap = container
    path = write_raw(tmp_path / f"train-images-idx3-ubyte{suffix}",
                     wrap(header_bytes(0x08, (60000, 28, 28)) + bytes(1000)))
    start = time.perf_counter()
    with raises_for(str(path), r"truncated payload: shape \(60000, 28, 28\).*47040000 data bytes, found 1000"):
        parse_idx(path)
    with raises_for(str(path), "truncated payload"):
        list(reader_chunks(path, 10_000))
    assert time.perf_counter() - start < 1.0


def test_lying_header_plain_file_allocates_nothing(tmp_path):
    """For uncompressed input the size is known: the truncation is found before any buffer is allocated."""
    path = write_raw(tmp_path / "liar.idx", header_bytes(0x0E, (2**20, 2**10, 2)) + bytes(64))  # declares 16 GiB
    tracemalloc.start()
    try:
        with raises_for(str(path), "truncated payload.*found 64"):
            parse_idx(path)
        with raises_for("<bytes>", "truncated payload.*found 64"):
            parse_idx(path.read_bytes())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_lying_header_larger_than_memory_is_an_input_error(tmp_path):
    """Declares 60 GiB (under the 64 GiB default limit) in a gz of a few bytes: never a bare MemoryError."""
    path = write_raw(tmp_path / "huge.gz", gz(header_bytes(0x08, (60, 2**30)) + bytes(10)))
    with raises_for(str(path), "truncated payload|more than this machine can allocate"):
        parse_idx(path)


# ----------------------------------------------------------------------------------------------------------------
# real data


def _readme_hashes() -> dict[str, str]:
    readme = MNIST_DIR.parent / "README.md"
    rows = re.findall(r"^\|\s*(\S+\.gz)\s*\|.*\|\s*([0-9a-f]{64})\s*\|\s*$", readme.read_text(), re.MULTILINE)
    return dict(rows[:3])  # the first table is MNIST's


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"real MNIST files not present at {MNIST_DIR}")
def test_real_mnist_files():
    spec = get_dataset("mnist")
    readme = _readme_hashes() if (MNIST_DIR.parent / "README.md").exists() else {}
    expected = {
        "t10k-images-idx3-ubyte.gz": ((10000, 28, 28), 7_840_016),
        "t10k-labels-idx1-ubyte.gz": ((10000,), 10_008),
        "train-labels-idx1-ubyte.gz": ((60000,), 60_008),
    }
    registry = {f.name: f.sha256 for f in spec.all_files()}
    for name, (shape, payload_bytes) in expected.items():
        path = MNIST_DIR / name
        if not path.exists():
            pytest.skip(f"{path} not present")
        parsed = parse_idx(path)
        assert parsed.array.shape == shape and parsed.array.dtype == np.uint8
        assert parsed.payload_bytes == payload_bytes
        assert parsed.sha256 == registry[name], name
        if readme:
            assert parsed.sha256 == readme[name], name
        assert parsed.sha256 == hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()
        if "labels" in name:
            assert parsed.array.min() == 0 and parsed.array.max() == 9
            assert set(np.unique(parsed.array).tolist()) == set(range(10))
        else:
            assert parsed.array.max() == 255 and parsed.array.min() == 0
    train_labels = read_idx(MNIST_DIR / "train-labels-idx1-ubyte.gz")
    # well-known MNIST facts: the first training labels and the class counts of the training set
    assert train_labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    assert np.bincount(train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    chunks = list(reader_chunks(MNIST_DIR / "t10k-images-idx3-ubyte.gz", 4096))
    assert [len(c) for c in chunks] == [4096, 4096, 1808]
    assert np.array_equal(np.concatenate(chunks), read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz"))


@pytest.mark.skipif(not FASHION_DIR.is_dir(),
                    reason=f"Fashion-MNIST not installed at {FASHION_DIR} (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_files():
    spec = get_dataset("fashion-mnist")
    arrays = {}
    for split, rows in (("train", 60_000), ("test", 10_000)):
        for kind, shape in (("images", (rows, 28, 28)), ("labels", (rows,))):
            entry = spec.file(split, kind)
            path = FASHION_DIR / entry.name
            if not path.exists():
                pytest.skip(f"{path} not present")
            parsed = parse_idx(path)
            assert parsed.array.shape == shape and parsed.array.dtype == np.uint8, entry.name
            assert parsed.sha256 == entry.sha256, entry.name
            assert parsed.payload_bytes == 4 + 4 * len(shape) + int(np.prod(shape))
            arrays[split, kind] = parsed.array
    assert np.bincount(arrays["train", "labels"], minlength=10).tolist() == [6000] * 10
    assert np.bincount(arrays["test", "labels"], minlength=10).tolist() == [1000] * 10
    assert arrays["train", "images"].max() == 255


def test_readme_and_registry_agree_on_mnist_hashes():
    if not (MNIST_DIR.parent / "README.md").exists():
        pytest.skip(f"{MNIST_DIR.parent / 'README.md'} not present")
    readme = _readme_hashes()
    assert len(readme) == 3
    registry = {f.name: f.sha256 for f in get_dataset("mnist").all_files()}
    for name, digest in readme.items():
        assert registry[name] == digest, name
