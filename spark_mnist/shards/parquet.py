"""Parquet encode and decode of the shard contract (:mod:`spark_mnist.shards.contract`), importable anywhere.

Encode (:func:`record_batch`, :func:`write_rows`, :func:`write_shard`) runs in the driver's Spark tasks; decode
(:func:`plan_row_groups`, :func:`read_rows`, ...) in every rank and in the side tools.  Whole row groups are decoded
at once from the binary column's contiguous buffer, never a row at a time.  Files are opened through
:func:`spark_mnist.fs.filesystem`: local and FUSE paths directly, object stores through ``pyarrow.fs``.

Corruption inside a shard is caught by Parquet's page checksums (a CRC-32 of every data page, in the format since
parquet-format 2.x): written where pyarrow writes them and verified on every read where pyarrow verifies them
(pyarrow 15 on, :data:`PAGE_CHECKSUMS`; pyarrow 14, Databricks Runtime 15.4, has neither and relies on the size
check of :func:`spark_mnist.shards.contract.open_dataset` and Snappy's own framing).  No Spark and no torch here.
"""

import contextlib
import functools
import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spark_mnist import fs
from spark_mnist.errors import DatasetMismatchError, InputError
from spark_mnist.paths import normalize_uri
from spark_mnist.shards import contract

__all__ = ["DEFAULT_READER_THREADS", "PAGE_CHECKSUMS", "record_batch", "write_rows", "write_shard",
           "RowGroup", "plan_row_groups", "total_rows", "decode_images", "pieces_in", "read_pieces",
           "read_rows", "iter_batches", "open_split"]  # fmt: skip

DEFAULT_READER_THREADS = 2
# pyarrow 15 added write_page_checksum (ParquetWriter) and page_checksum_verification (ParquetFile).
PAGE_CHECKSUMS = "page_checksum_verification" in inspect.signature(pq.ParquetFile.__init__).parameters
# (index (n,) int64, images (n, row_bytes) uint8, labels (n,) int64): rows read back.
_Rows = tuple[np.ndarray, np.ndarray, np.ndarray]
_VERIFY = {"page_checksum_verification": True} if PAGE_CHECKSUMS else {}
# Snappy, no dictionary encoding (every image is a distinct value), statistics on index and label only.
_WRITE = dict(compression="snappy", use_dictionary=False, write_statistics=[contract.INDEX, contract.LABEL])
_WRITE.update({"write_page_checksum": True} if PAGE_CHECKSUMS else {})


def record_batch(start: int, images: np.ndarray, labels: np.ndarray) -> pa.RecordBatch:
    """An Arrow record batch of the shard contract for global rows ``start .. start+n``.

    Args:
        start: the global row number (``index`` column) of the first row.
        images: uint8 array of shape (n, H, W); becomes the binary column without a per-row loop (one offsets
            buffer over the contiguous pixel buffer, H*W bytes per row).
        labels: integer array of shape (n,); stored as int32.
    Returns:
        A record batch with the columns ``index`` (int64), ``image`` (binary), ``label`` (int32).
    """
    n = len(labels)
    offsets = np.arange(n + 1, dtype=np.int32) * np.int32(np.prod(images.shape[1:]))  # H*W bytes a row
    pixels = pa.py_buffer(np.ascontiguousarray(images))
    image = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pixels])
    # Arrays straight from their buffers: pa.array(ndarray) imports pandas, seconds in a fresh task or process.
    index = pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(np.arange(start, start + n, dtype=np.int64))])
    label = pa.Array.from_buffers(pa.int32(), n, [None, pa.py_buffer(np.ascontiguousarray(labels, dtype=np.int32))])
    return pa.RecordBatch.from_arrays([index, image, label], names=list(contract.COLUMNS))


def write_rows(sink: BinaryIO, start: int, images: np.ndarray, labels: np.ndarray, rows_per_group: int) -> None:
    """Write global rows ``start ..`` of ``images`` (n, H, W) uint8 and ``labels`` (n,) to ``sink`` as one Parquet
    file, in row groups of ``rows_per_group`` rows: Snappy, no dictionary encoding (every image is a distinct
    value), statistics on ``index`` and ``label`` only, page checksums where pyarrow writes them."""
    schema = record_batch(start, images[:0], labels[:0]).schema
    with pq.ParquetWriter(sink, schema, **_WRITE) as writer:
        for lo in range(0, len(labels), rows_per_group):  # one record batch a row group, written as it is made
            hi = lo + rows_per_group
            writer.write_batch(record_batch(start + lo, images[lo:hi], labels[lo:hi]))


def write_shard(root: str, path: str, images: np.ndarray, labels: np.ndarray, start: int, rows_per_group: int) -> int:
    """Write one shard file, ``root/path`` (``root``: ``OUT``'s URI or local path, ``path``: the shard's path
    relative to it, :func:`spark_mnist.shards.contract.shard_path`), from global rows ``start ..`` of ``images``
    (n, H, W) uint8 and ``labels`` (n,) (:func:`write_rows`).  Runs in a Spark task.

    The file is written under its final name, with no scratch name and no rename: it lies in a fresh generation
    that no manifest names yet, so no reader sees it before the commit, and a store that refuses renames (a
    ``/Volumes`` FUSE mount, Azure without hierarchical namespace) is never asked for one.  A retried attempt
    writes the same file again; an attempt that fails with an exception removes its file; what one killed
    outright leaves is removed with its generation (:mod:`spark_mnist.shards.commit`).

    Returns:
        The file's size in bytes, for the manifest.
    Raises:
        SourceError: ``root`` is on no file system this machine reaches (:func:`spark_mnist.fs.filesystem`).
        OSError: the file could not be written.
    """
    filesystem, base = fs.filesystem(normalize_uri(root).join(*path.split("/")))
    if filesystem.type_name == "local":  # object stores have no directories to make (one request fewer a shard)
        filesystem.create_dir(base.rsplit("/", 1)[0], recursive=True)
    try:
        with filesystem.open_output_stream(base) as sink:
            write_rows(sink, start, images, labels, rows_per_group)
            return sink.tell()
    except BaseException:
        with contextlib.suppress(OSError):  # the stream may have failed before creating the file
            filesystem.delete_file(base)
        raise


@functools.lru_cache(maxsize=64)
def _opener(path: str):
    """``(file system, path on it)`` of a shard named by a local path or a URI (:func:`spark_mnist.fs.filesystem`)."""
    return fs.filesystem(normalize_uri(path))


def _open_parquet(path: str, metadata=None) -> pq.ParquetFile:
    """The Parquet file ``path`` (a local or FUSE path, a ``file:``/``dbfs:`` URL, or an object store's URI), with
    page checksums verified where pyarrow can (:data:`PAGE_CHECKSUMS`).

    Raises:
        SourceError: a place no file system here reaches (:func:`spark_mnist.fs.filesystem`).
        OSError: the file cannot be opened (missing, or a page whose checksum fails when it is read).
    """
    filesystem, located = _opener(path)
    return pq.ParquetFile(filesystem.open_input_file(located), metadata=metadata, **_VERIFY)


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group in the global row order: file ``path``, its ``row_group`` number, global row
    ``start`` and ``rows``; ``metadata``, the file's parsed footer (shared by its row groups), spares re-reading it
    for every row group decoded."""

    path: str
    row_group: int
    start: int
    rows: int
    metadata: Any = field(default=None, compare=False, repr=False)


# A row group and the global rows [a, b) taken from it.
_Piece = tuple[RowGroup, int, int]


def plan_row_groups(paths: Sequence[str]) -> list[RowGroup]:
    """Every row group of ``paths`` (sorted, so every rank computes the same plan) with its global row offset.

    ``paths`` are what :meth:`spark_mnist.shards.contract.Dataset.files` gives: local paths, ``file:``/``dbfs:``
    URLs (petastorm's converter names its files so) or object stores' URIs, each opened by :func:`_open_parquet`.
    """
    plan, start = [], 0
    for path in sorted(paths, key=lambda path: normalize_uri(path).display):
        with _open_parquet(path) as f:
            metadata = f.metadata
        for i in range(metadata.num_row_groups):
            rows = metadata.row_group(i).num_rows
            if rows:
                plan.append(RowGroup(path, i, start, rows, metadata))
                start += rows
    return plan


def total_rows(plan: Sequence[RowGroup]) -> int:
    """Rows in all of ``plan``'s row groups."""
    return plan[-1].start + plan[-1].rows if plan else 0


def decode_images(column, row_bytes: int, path: str = "<parquet>") -> np.ndarray:
    """Decode a binary Arrow column of fixed-size rows into a (n, row_bytes) uint8 array, without a per-row loop:
    the column's values buffer is already the rows back to back.

    Raises:
        DatasetMismatchError: a null or a row whose length is not ``row_bytes``.
    """
    if column.null_count:
        raise DatasetMismatchError(f"{path}: {column.null_count} null images in column {contract.IMAGE!r}")
    parts = []
    for chunk in _chunks(column):
        _, offsets_buf, data_buf = chunk.buffers()  # binary: int32 offsets (what the contract's writers write)
        offsets = np.frombuffer(offsets_buf, dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        if np.any(np.diff(offsets) != row_bytes):
            raise DatasetMismatchError(f"{path}: images are not all {row_bytes} bytes (the contract's H*W)")
        parts.append(np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]].reshape(-1, row_bytes))
    return parts[0] if len(parts) == 1 else np.concatenate([np.empty((0, row_bytes), dtype=np.uint8), *parts])


def pieces_in(plan: Sequence[RowGroup], lo: int, hi: int) -> list[_Piece]:
    """The row groups of ``plan`` that hold global rows ``[lo, hi)``, each with the global rows ``(a, b)`` taken."""
    return [(g, max(lo, g.start), min(hi, g.start + g.rows)) for g in plan if g.start < hi and g.start + g.rows > lo]


def read_pieces(pieces: Sequence[_Piece], row_bytes: int, threads: int = DEFAULT_READER_THREADS) -> _Rows:
    """The rows of ``(row group, a, b)`` pieces, in piece order: ``(index (n,) int64, images (n, row_bytes) uint8,
    labels (n,) int64)``.  Row groups are decoded with ``threads`` readers and copied once into the result."""
    total = sum(b - a for _, a, b in pieces)
    result: _Rows = (np.empty(total, np.int64), np.empty((total, row_bytes), np.uint8), np.empty(total, np.int64))
    position = 0
    for (group, a, b), decoded in zip(pieces, _decode_groups([g for g, _, _ in pieces], row_bytes, threads)):
        for out, column in zip(result, decoded):
            out[position : position + b - a] = column[a - group.start : b - group.start]
        position += b - a
    return result


def read_rows(plan: Sequence[RowGroup], lo: int, hi: int, row_bytes: int) -> _Rows:
    """Global rows ``[lo, hi)``: ``(index (n,) int64, images (n, row_bytes) uint8, labels (n,) int64)``, decoded
    with :data:`DEFAULT_READER_THREADS` readers."""
    return read_pieces(pieces_in(plan, lo, hi), row_bytes)


def iter_batches(plan: Sequence[RowGroup], batch_size: int, row_bytes: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every row of ``plan`` once, in global row order, in batches of ``batch_size`` rows (the last one shorter):
    ``(images (n, row_bytes) uint8, labels (n,) int64)``.  Each row group is decoded once, in plan order, with
    :data:`DEFAULT_READER_THREADS` readers; torch-free, for whoever reads a whole split in order (evaluation, the
    side tools).

    ``batch_size`` is at least 1 (:func:`spark_mnist.tools.evaluate.evaluate_model` checks it first).

    Raises:
        DatasetMismatchError: a row group that does not decode as the shard contract.
    """
    images, labels = np.empty((0, row_bytes), dtype=np.uint8), np.empty(0, dtype=np.int64)
    for _, group_images, group_labels in _decode_groups(plan, row_bytes, DEFAULT_READER_THREADS):
        images, labels = np.concatenate([images, group_images]), np.concatenate([labels, group_labels])
        cut = len(labels) - len(labels) % batch_size
        yield from ((images[lo : lo + batch_size], labels[lo : lo + batch_size]) for lo in range(0, cut, batch_size))
        images, labels = images[cut:], labels[cut:]
    if len(labels):
        yield images, labels


def _decode_group(group: RowGroup, row_bytes: int) -> _Rows:
    with _open_parquet(group.path, group.metadata) as f:
        table = f.read_row_group(group.row_group, columns=list(contract.COLUMNS))
    index, labels = (_int_column(table.column(name), group.path) for name in (contract.INDEX, contract.LABEL))
    return index, decode_images(table.column(contract.IMAGE), row_bytes, group.path), labels


def _int_column(column, path: str = "<parquet>") -> np.ndarray:
    """An int32/int64 Arrow column as an int64 numpy array, straight from its buffers (``to_numpy`` would import pandas
    in pyarrow 14, which costs more than reading a whole split).

    Raises:
        DatasetMismatchError: nulls, or a column that is not int32/int64.
    """
    dtype = {pa.int32(): np.int32, pa.int64(): np.int64}.get(column.type)
    if dtype is None:
        raise DatasetMismatchError(f"{path}: column of type {column.type}: expected int32 or int64")
    if column.null_count:
        raise DatasetMismatchError(f"{path}: {column.null_count} nulls in an integer column")
    parts = [np.frombuffer(c.buffers()[1], dtype=dtype)[c.offset : c.offset + len(c)] for c in _chunks(column)]
    return np.concatenate([np.empty(0, dtype=np.int64), *parts])  # int64, a copy the caller owns


def _chunks(column) -> list:
    """The non-empty chunks of an Arrow array or chunked array."""
    return [chunk for chunk in (column.chunks if isinstance(column, pa.ChunkedArray) else [column]) if len(chunk)]


def _decode_groups(groups: Sequence[RowGroup], row_bytes: int, threads: int):
    """Decode ``groups`` with ``threads`` readers, yielding results in ``groups`` order (so order never depends on
    the thread count)."""
    if threads <= 1 or len(groups) <= 1:
        yield from (_decode_group(g, row_bytes) for g in groups)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shard-reader") as pool:
        yield from pool.map(lambda g: _decode_group(g, row_bytes), groups)


def open_split(data_dir: str | os.PathLike, split: str) -> tuple[contract.Dataset, list[RowGroup]]:
    """The dataset in ``data_dir`` (:func:`spark_mnist.shards.contract.open_dataset`) and the row groups of its
    ``split`` (:func:`plan_row_groups`), for the side tools that read one split (evaluate, preview).

    Raises:
        DatasetNotFoundError: no complete dataset in ``data_dir`` (local, FUSE or an object store).
        InputError: an unknown ``split``.
        DatasetMismatchError: the split holds no rows.
    """
    dataset = contract.open_dataset(data_dir)
    try:
        rows = dataset.rows(split)  # the manifest's count, known before any shard's footer is read
    except ValueError as e:  # "Invalid split: ... Must be one of ...", said with the dataset's place
        raise InputError(f"{dataset.location.shown}: {e}") from e
    if rows == 0:
        raise DatasetMismatchError(f"{dataset.location.shown}: split {split!r} holds no rows")
    return dataset, plan_row_groups(dataset.files(split))
