"""Reading and checking the sources of an ingest, on the driver: the IDX files of each split, opened as streams
once their headers and labels are checked, or a Keras ``mnist.npz``; and the manifest records of every source file.

Nothing here writes: every structural check that the headers and labels allow runs before ingest writes anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from spark_mnist.datasets import (
    IMAGES,
    LABELS,
    SPLITS,
    DatasetFile,
    DatasetSpec,
    hash_mismatch_message,
    validate_split,
)
from spark_mnist.driver.sources import SourceFile, read_files
from spark_mnist.errors import ChecksumMismatchError
from spark_mnist.formats.idx import IdxReader, parse_idx
from spark_mnist.formats.keras_npz import load_keras_npz
from spark_mnist.paths import Location, redact

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["file_record", "SplitInput", "open_idx_split", "read_npz", "check_hashes"]

log = logging.getLogger(__name__)


def file_record(
    split: str, kind: str, entry: DatasetFile, source: SourceFile, sha256: str, payload_bytes: int
) -> dict[str, Any]:
    """The manifest's record of one source file; ``sha256_matches`` is ``None`` where the registry knows no hash."""
    return {
        "split": split,
        "kind": kind,
        "name": entry.name,
        "uri": redact(source.uri),
        "bytes": source.length,
        "payload_bytes": payload_bytes,
        "sha256": sha256,
        "expected_sha256": entry.sha256,
        "sha256_matches": None if entry.sha256 is None else sha256 == entry.sha256,
    }


@dataclass
class SplitInput:
    """One split ready to write: all ``labels`` (N,) uint8, and ``take(rows)`` giving the next ``rows`` images
    (rows, H, W) uint8 as stored; ``done()`` checks the end of the images file and returns its manifest record."""

    name: str
    labels: np.ndarray
    take: Callable[[int], np.ndarray]
    done: Callable[[], list[dict[str, Any]]]


def open_idx_split(
    stack: contextlib.ExitStack, spec: DatasetSpec, split: str, files: dict[str, SourceFile]
) -> tuple[SplitInput, list[dict[str, Any]]]:
    """Parse a split's labels file and open its images file as a stream, checking everything the headers and
    labels tell (image shape, dtype, counts, label range) before any image data is read.  Driver only.

    Returns:
        The :class:`SplitInput` and the labels file's manifest record.
    Raises:
        IdxFormatError: a structural defect in either file (in the images file's data: while it is taken).
        DatasetMismatchError: wrong image shape, labels out of range, different counts.
    """
    labels_entry, images_entry = spec.file(split, LABELS), spec.file(split, IMAGES)
    labels_source, images_source = files[labels_entry.name], files[images_entry.name]
    parsed = parse_idx(labels_source.source, name=redact(labels_source.uri))
    reader = stack.enter_context(IdxReader(images_source.source, name=redact(images_source.uri)))
    validate_split(spec, reader.header, parsed.array, redact(images_source.uri), redact(labels_source.uri))

    def done() -> list[dict[str, Any]]:
        reader.finish()
        return [file_record(split, IMAGES, images_entry, images_source, reader.sha256, reader.payload_bytes)]

    labels_record = file_record(split, LABELS, labels_entry, labels_source, parsed.sha256, parsed.payload_bytes)
    return SplitInput(split, parsed.array, reader.read, done), [labels_record]


def _slicer(images: np.ndarray) -> Callable[[int], np.ndarray]:
    """``take(rows)`` over an array held in memory: consecutive slices."""
    position = 0

    def take(rows: int) -> np.ndarray:
        nonlocal position
        lo, position = position, position + rows
        return images[lo:position]

    return take


def read_npz(spark: "SparkSession", spec: DatasetSpec, npz: Location) -> tuple[list[SplitInput], list[dict]]:
    """Read a Keras ``mnist.npz`` (bytes through Spark's ``binaryFile`` source, ``np.load(allow_pickle=False)``)
    and check both splits against ``spec``.

    Raises:
        SourceError: the file is missing.
        InputError: not a Keras npz archive (see :func:`spark_mnist.formats.keras_npz.load_keras_npz`).
        DatasetMismatchError: shapes, label range or counts that do not fit ``spec``.
    """
    source = read_files(spark, npz.sibling(""), [npz.name])[npz.name]
    content = source.content
    if content is None:  # a large archive on a driver-visible path: np.load reads it whole anyway
        with open(source.source, "rb") as f:
            content = f.read()
    arrays = load_keras_npz(io.BytesIO(content), spec, name=redact(source.uri))  # checks both splits against spec
    inputs = [SplitInput(split, arrays[split][1], _slicer(arrays[split][0]), list) for split in SPLITS]
    digest = hashlib.sha256(content, usedforsecurity=False).hexdigest()
    return inputs, [file_record("train+test", "npz", DatasetFile(npz.name), source, digest, source.length)]


def check_hashes(spec: DatasetSpec, records: list[dict[str, Any]], *, strict: bool) -> None:
    """Warn about (or, with ``strict``, refuse) payloads whose sha256 differs from the registry's.  A subset or a
    relabelled copy in the same format is legitimate input, so this is a warning by default.

    Raises:
        ChecksumMismatchError: with ``strict``, the first mismatching file.
    """
    for record in records:
        if record["sha256_matches"] is False:
            message = hash_mismatch_message(spec.name, record["uri"], record["sha256"], record["expected_sha256"])
            if strict:
                raise ChecksumMismatchError(message + " (ingest.strict)")
            log.warning("%s; ingesting it anyway (ingest.strict refuses it)", message)
