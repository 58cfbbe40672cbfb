"""Reading and checking the sources of an ingest, on the driver: the files' bytes, the IDX files of each split opened
as streams once their headers and labels are checked, or a Keras ``mnist.npz``; and the manifest records of every
source file.  Nothing here writes: every structural check that the headers and labels allow runs before ingest writes
anything.

The bytes come from a directory (local, ``file:/``, ``dbfs:/``, ``/dbfs/``, ``/Volumes/``, or an object store's
``s3://``, ``gs://``, ``abfss://``) read with Spark's ``binaryFile`` source.  An object-store URI that carries a query
string (pyarrow's ``endpoint_override``, ``account_key``, ...) or credentials is read through :mod:`pyarrow.fs` on the
driver instead: Hadoop's file systems take neither, and a secret must not enter Spark's plans, UI or event log.  So is
a bare URI whose scheme this session's Spark has no file system for (local Spark without ``hadoop-aws``); on
Databricks, Spark reads it.
"""

import hashlib
import io
import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence
from urllib.parse import urlsplit

import numpy as np

from spark_mnist import fs
from spark_mnist.datasets import IMAGES, LABELS, SPLITS, DatasetFile, DatasetSpec, validate_split
from spark_mnist.driver import session
from spark_mnist.errors import SourceError
from spark_mnist.formats.idx import IdxReader, parse_idx
from spark_mnist.formats.keras_npz import load_keras_npz
from spark_mnist.paths import Location, check_visible_to_executors, redact

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["MAX_COLLECT_BYTES", "SourceFile", "read_files", "SplitInput", "open_idx_split", "read_npz"]

log = logging.getLogger(__name__)

# Files up to this size travel to the driver through Spark's binaryFile source; larger ones (binaryFile stops at
# 2 GiB, and the driver would hold them whole) are streamed from their driver-visible path (local, /dbfs, /Volumes).
MAX_COLLECT_BYTES = 512 * 2**20


class SourceFile(NamedTuple):
    """One source file: ``uri`` (as Spark names it), ``length`` (bytes, still compressed) and ``source``, what
    :class:`spark_mnist.formats.idx.IdxReader` reads: the bytes (read through Spark) or a local path to stream from
    (for files over :data:`MAX_COLLECT_BYTES`)."""

    uri: str
    length: int
    source: bytes | str


def read_files(spark: "SparkSession", directory: Location, names: Sequence[str]) -> dict[str, SourceFile]:
    """Read the files ``names`` under ``directory`` with Spark's ``binaryFile`` source, in one job; files over
    :data:`MAX_COLLECT_BYTES` with a driver-visible path are left to be streamed from it instead.

    Returns:
        ``{name: SourceFile}`` for every name.
    Raises:
        SourceError: a missing directory or file (the message names each missing path), or a driver-local path
            that the executors of a cluster could not see.
    """
    check_visible_to_executors(session.master_here(spark), directory)
    if not fs.exists(directory):
        raise SourceError(f"{directory.shown}: source directory not found")
    wanted = {name: directory.join(name) for name in names}
    if missing := [loc.shown for loc in wanted.values() if not fs.exists(loc)]:
        raise SourceError(f"{', '.join(missing)}: file not found (expected {', '.join(names)} in {directory.shown})")
    found, collect = {}, []
    for name, loc in wanted.items():
        if loc.os_path is not None and (size := os.path.getsize(loc.os_path)) > MAX_COLLECT_BYTES:
            found[name] = SourceFile(loc.uri, size, loc.os_path)
        elif loc.kind != "remote" or not (urlsplit(loc.uri).query or redact(loc.uri) != loc.uri):
            collect.append(name)  # Spark may read it: not an object-store URI with a query string or credentials
    if collect:
        # toPandas goes through Arrow (spark.sql.execution.arrow.pyspark.enabled): faster than collect() here.
        try:
            frame: Any = spark.read.format("binaryFile").load([wanted[name].uri for name in collect]).toPandas()
            rows = {row.path.rstrip("/").rsplit("/", 1)[-1]: row for row in frame.itertuples()}  # by file name
        except Exception as e:
            # What Hadoop says, classic and over Spark Connect alike, for a scheme it has no file system for:
            if not any(marker in str(e) for marker in ("UnsupportedFileSystemException", "No FileSystem for scheme")):
                raise
            message = "%s: this Spark has no file system for %s://; reading the files through pyarrow on the driver"
            log.info(message, directory.shown, urlsplit(directory.uri).scheme)
            rows, collect = {}, []  # every file through pyarrow, below
        for name in collect:
            if (row := rows.get(name)) is None:
                raise SourceError(f"{wanted[name].uri}: Spark's binaryFile source returned no content for this file")
            if row.length > MAX_COLLECT_BYTES:
                raise SourceError(
                    f"{row.path}: {row.length} bytes, too large to read through Spark onto the driver; put it "
                    f"on a path the driver can stream from (/dbfs/..., /Volumes/..., local disk)"
                )
            found[name] = SourceFile(row.path, int(row.length), bytes(row.content))
    for name in [name for name in names if name not in found]:  # what Spark does not read: pyarrow on the driver
        filesystem, path = fs.filesystem(wanted[name])
        with filesystem.open_input_stream(path) as stream:
            content = stream.read()
        found[name] = SourceFile(wanted[name].uri, len(content), content)
    return {name: found[name] for name in names}


def _record(split: str, kind: str, entry: DatasetFile, source: SourceFile, sha256: str, payload_bytes: int) -> dict:
    """The manifest's record of one source file; ``sha256_matches`` is ``None`` where the registry knows no hash."""
    same = None if entry.sha256 is None else sha256 == entry.sha256
    sums = {"payload_bytes": payload_bytes, "sha256": sha256, "expected_sha256": entry.sha256, "sha256_matches": same}
    return {"split": split, "kind": kind, "name": entry.name, "uri": redact(source.uri), "bytes": source.length, **sums}


class SplitInput(NamedTuple):
    """One split ready to write: all ``labels`` (N,) uint8, ``take(rows)`` giving the images (rows, H, W) uint8 of
    the slice ``rows`` as stored (consecutive slices, in order), and ``done()``, which checks the end of the images
    file and returns the manifest records of the split's files."""

    labels: np.ndarray
    take: Callable[[slice], np.ndarray]
    done: Callable[[], list[dict[str, Any]]]


def open_idx_split(stack: ExitStack, spec: DatasetSpec, split: str, files: dict[str, SourceFile]) -> SplitInput:
    """Parse a split's labels file and open its images file as a stream on ``stack``, checking everything the
    headers and labels tell (image shape, dtype, counts, label range) before any image data is read.  Driver only.

    Raises:
        IdxFormatError: a structural defect in either file (in the images file's data: while it is taken).
        DatasetMismatchError: wrong image shape, labels out of range, different counts.
    """
    labels_entry, images_entry = spec.file(split, LABELS), spec.file(split, IMAGES)
    labels_source, images_source = files[labels_entry.name], files[images_entry.name]
    labels_name, images_name = redact(labels_source.uri), redact(images_source.uri)
    parsed = parse_idx(labels_source.source, name=labels_name)
    reader = stack.enter_context(IdxReader(images_source.source, name=images_name))
    validate_split(spec, reader.header, parsed.array, images_name, labels_name)
    labels_record = _record(split, LABELS, labels_entry, labels_source, parsed.sha256, parsed.payload_bytes)

    def done() -> list[dict[str, Any]]:
        reader.finish()
        return [_record(split, IMAGES, images_entry, images_source, reader.sha256, reader.payload_bytes), labels_record]

    return SplitInput(parsed.array, lambda rows: reader.read(rows.stop - rows.start), done)


def read_npz(spark: "SparkSession", spec: DatasetSpec, npz: Location) -> tuple[dict[str, SplitInput], list[dict]]:
    """Read a Keras ``mnist.npz`` (bytes through Spark's ``binaryFile`` source, ``np.load(allow_pickle=False)``)
    and check both splits against ``spec``.

    Returns:
        The splits by name (train, test) and the archive's manifest record.
    Raises:
        SourceError: the file is missing.
        InputError: not a Keras npz archive (see :func:`spark_mnist.formats.keras_npz.load_keras_npz`).
        DatasetMismatchError: shapes, label range or counts that do not fit ``spec``.
    """
    source = read_files(spark, npz.sibling(""), [npz.name])[npz.name]
    # A large archive on a driver-visible path is streamed by nothing: np.load reads it whole anyway.
    content = source.source if isinstance(source.source, bytes) else Path(source.source).read_bytes()
    arrays = load_keras_npz(io.BytesIO(content), spec, name=redact(source.uri))  # checks both splits against spec
    inputs = {split: SplitInput(arrays[split][1], arrays[split][0].__getitem__, list) for split in SPLITS}
    digest = hashlib.sha256(content, usedforsecurity=False).hexdigest()
    return inputs, [_record("train+test", "npz", DatasetFile(npz.name), source, digest, source.length)]
