"""Driver-side ingest: gz IDX bytes -> validated numpy arrays -> Parquet shards + ``_manifest.json``.

The order of work is what makes bad input cheap and failures harmless:

1. read the four files' bytes with Spark's ``binaryFile`` source (:mod:`spark_mnist.sources`);
2. parse and check every file on the driver (:mod:`spark_mnist.idx`, :func:`spark_mnist.datasets.validate_split`),
   before anything is written;
3. write both splits and the manifest into a staging directory beside ``OUT``;
4. commit: move the staging directory to ``OUT``, replacing any previous dataset (:func:`commit`).

Readers see either the previous complete dataset or the new one, never a mix.  The shard layout is the contract in
:mod:`spark_mnist.contract`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from spark_mnist import __version__, contract, storage
from spark_mnist.datasets import IMAGES, LABELS, SPLITS, DatasetSpec, get_dataset, upright, validate_split
from spark_mnist.errors import ChecksumMismatchError, InputError
from spark_mnist.idx import parse_idx
from spark_mnist.sources import SourceFile, read_files
from spark_mnist.storage import Location, normalize_uri

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

DEFAULT_NUM_SHARDS = 8
# Parquet row-group target: ~1 MiB is ~1,300 MNIST rows, so 60,000 training rows make ~45 row groups and every rank
# of a typical run (up to 8 x a few GPUs) has several of them.
DEFAULT_ROW_GROUP_BYTES = 2**20
SPARK_SCHEMA = ", ".join(f"{name} {spark_type}" for name, (spark_type, _) in contract.COLUMN_TYPES.items())
COMMIT_RETRIES = 20


@dataclass(frozen=True)
class Split:
    """One validated split: ``images`` (N, H, W) uint8 upright, ``labels`` (N,) uint8."""

    name: str
    images: np.ndarray
    labels: np.ndarray


def parse_split(spec: DatasetSpec, split: str, files: dict[str, SourceFile]) -> tuple[Split, list[dict[str, Any]]]:
    """Parse and check one split's images and labels files (driver only).

    Returns:
        The :class:`Split` and one manifest record per file (uri, bytes, payload bytes, sha256, expected sha256,
        whether they match: ``None`` where the registry knows no hash).
    Raises:
        IdxFormatError: a structural defect in either file.
        DatasetMismatchError: wrong image shape, labels out of range, different counts.
    """
    arrays, records = {}, []
    for kind in (IMAGES, LABELS):
        entry = spec.file(split, kind)
        source = files[entry.name]
        parsed = parse_idx(source.content, name=source.uri)
        arrays[kind] = parsed.array
        matches = None if entry.sha256 is None else parsed.sha256 == entry.sha256
        records.append({"split": split, "kind": kind, "name": entry.name, "uri": source.uri,
                        "bytes": source.length, "payload_bytes": parsed.payload_bytes, "sha256": parsed.sha256,
                        "expected_sha256": entry.sha256, "sha256_matches": matches})
    images_uri, labels_uri = (files[spec.file(split, kind).name].uri for kind in (IMAGES, LABELS))
    validate_split(spec, arrays[IMAGES], arrays[LABELS], images_uri, labels_uri)
    return Split(split, upright(spec, arrays[IMAGES]), arrays[LABELS]), records


def read_npz(spark: "SparkSession", spec: DatasetSpec, npz: Location) -> tuple[dict[str, Split], list[dict]]:
    """Read a Keras ``mnist.npz`` (bytes through Spark's ``binaryFile`` source, ``np.load(allow_pickle=False)``)
    and check both splits against ``spec``.

    Raises:
        SourceError: the file is missing.
        InputError: not a Keras npz archive (see :func:`spark_mnist.keras_npz.load_keras_npz`).
        DatasetMismatchError: shapes, label range or counts that do not fit ``spec``.
    """
    import hashlib
    import io

    from spark_mnist.keras_npz import load_keras_npz

    source = read_files(spark, npz.sibling(""), [npz.name])[npz.name]
    arrays = load_keras_npz(io.BytesIO(source.content), image_shape=spec.image_shape, name=source.uri)
    splits = {}
    for split in SPLITS:
        images, labels = arrays[split]
        validate_split(spec, images, labels, f"{source.uri}[x_{split}]", f"{source.uri}[y_{split}]")
        splits[split] = Split(split, upright(spec, images), labels)
    digest = hashlib.sha256(source.content, usedforsecurity=False).hexdigest()
    record = {"split": "train+test", "kind": "npz", "name": npz.name, "uri": source.uri, "bytes": source.length,
              "payload_bytes": source.length, "sha256": digest, "expected_sha256": None, "sha256_matches": None}
    return splits, [record]


def check_hashes(spec: DatasetSpec, records: list[dict[str, Any]], *, strict: bool) -> None:
    """Warn about (or, with ``strict``, refuse) payloads whose sha256 differs from the registry's.  A subset or a
    relabelled copy in the same format is legitimate input, so this is a warning by default.

    Raises:
        ChecksumMismatchError: with ``strict``, the first mismatching file.
    """
    for record in records:
        if record["sha256_matches"] is False:
            message = (f"{record['uri']}: payload sha256 {record['sha256']} differs from {spec.name}'s published "
                       f"{record['expected_sha256']}")
            if strict:
                raise ChecksumMismatchError(message + " (--strict)")
            log.warning("%s; ingesting it anyway (--strict refuses it)", message)


def shard_bounds(rows: int, num_shards: int) -> np.ndarray:
    """Row boundaries of ``num_shards`` contiguous shards over ``rows`` rows: shard k is ``[b[k], b[k+1])``; sizes
    differ by at most one.  ``num_shards`` is capped at ``rows`` so that no shard is empty."""
    shards = max(1, min(num_shards, rows))
    return np.linspace(0, rows, shards + 1).round().astype(np.int64)


def record_batch(start: int, images: np.ndarray, labels: np.ndarray):
    """An Arrow record batch of the shard contract for rows ``start .. start+len(labels)``.

    ``images`` (n, H, W) uint8 becomes the binary column without a per-row loop: one offsets buffer over the
    contiguous pixel buffer.
    """
    import pyarrow as pa

    n = len(labels)
    row_bytes = int(np.prod(images.shape[1:]))
    pixels = np.ascontiguousarray(images).reshape(-1)
    offsets = np.arange(0, (n + 1) * row_bytes, row_bytes, dtype=np.int32)
    image = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(pixels)])
    return pa.RecordBatch.from_arrays(
        [pa.array(np.arange(start, start + n, dtype=np.int64)), image, pa.array(labels.astype(np.int32))],
        names=list(contract.COLUMNS))


def write_split(spark: "SparkSession", split: Split, target: Location, num_shards: int,
                row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES) -> list[int]:
    """Write ``split`` as Parquet shards under ``target`` with Spark; shard k holds the k-th contiguous row range.

    The arrays travel to the executors once, as a broadcast; each task cuts its shard into Arrow batches
    (``mapInArrow``), so no row passes through Python one at a time.  Files are renamed ``part-NNNNN.parquet``
    in shard order, so the same input always gives the same files.

    Returns:
        Rows per shard, in shard order.
    """
    bounds = shard_bounds(len(split.labels), num_shards)
    rows_per_batch = max(1, row_group_bytes // max(1, int(np.prod(split.images.shape[1:]))))
    broadcast = spark.sparkContext.broadcast((split.images, split.labels))
    try:
        def shard_batches(batches: Iterator) -> Iterator:
            images, labels = broadcast.value
            for batch in batches:
                for shard in batch.column(0).to_pylist():
                    lo, hi = int(bounds[shard]), int(bounds[shard + 1])
                    for start in range(lo, hi, rows_per_batch):
                        stop = min(hi, start + rows_per_batch)
                        yield record_batch(start, images[start:stop], labels[start:stop])

        shards = len(bounds) - 1
        (spark.range(shards, numPartitions=shards)
         .mapInArrow(shard_batches, SPARK_SCHEMA)
         .write.option("parquet.block.size", row_group_bytes)
         .mode("errorifexists")
         .parquet(target.uri))
    finally:
        broadcast.destroy()
    _name_shards(spark, target, shards)
    return np.diff(bounds).tolist()


def _name_shards(spark: "SparkSession", target: Location, shards: int) -> None:
    files = storage.list_files(spark, target)
    parts = [name for name, _ in files if name.startswith("part-") and name.endswith(".parquet")]
    if len(parts) != shards:
        raise RuntimeError(f"{target.uri}: Spark wrote {len(parts)} Parquet files, expected {shards} shards")
    for name, _ in files:
        if name not in parts:  # _SUCCESS, checksum files
            storage.delete(spark, target.join(name))
    for k, name in enumerate(sorted(parts)):
        storage.rename(spark, target.join(name), target.join(contract.shard_name(k)))


def build_manifest(spec: DatasetSpec, source: Location, records: list[dict[str, Any]],
                   splits: dict[str, Split], rows_per_shard: dict[str, list[int]]) -> dict[str, Any]:
    """The ``_manifest.json`` content: dataset, source files (uri, bytes, payload sha256), per-split rows,
    shards and label histogram, schema and package versions."""
    return {
        "schema_version": contract.SCHEMA_VERSION,
        "package_version": __version__,
        "dataset": spec.name,
        "classes": list(spec.classes),
        "image_shape": list(spec.image_shape),
        "columns": {name: spark_type for name, (spark_type, _) in contract.COLUMN_TYPES.items()},
        "created_unix": round(time.time(), 3),
        "source": {"uri": source.uri, "files": records},
        "splits": {
            name: {
                "rows": int(len(split.labels)),
                "files": [contract.shard_name(k) for k in range(len(rows_per_shard[name]))],
                "rows_per_shard": rows_per_shard[name],
                "label_histogram": np.bincount(split.labels, minlength=spec.num_classes).tolist(),
            }
            for name, split in splits.items()
        },
    }


def commit(spark: "SparkSession", staging: Location, output: Location) -> None:
    """Make the complete dataset in ``staging`` appear as ``output``, replacing what was there.

    A previous dataset is first moved aside (``.OUT.old-*``), then ``staging`` is renamed into place, then the old
    one is deleted.  Concurrent ingests into one ``output`` each retry until their rename lands, so the last to
    commit wins and ``output`` always holds one complete dataset.  If the process dies between the two renames,
    :func:`recover` (run at the start of every ingest) puts the previous dataset back.
    """
    for _ in range(COMMIT_RETRIES):
        try:
            storage.rename(spark, staging, output)
            break
        except FileExistsError:
            aside = output.sibling(f".{output.name}.old-{uuid.uuid4().hex[:12]}")
            try:
                storage.rename(spark, output, aside)
            except (FileNotFoundError, FileExistsError):
                continue  # another ingest moved it first
            storage.delete(spark, aside)
    else:
        raise RuntimeError(f"{output.uri}: could not commit after {COMMIT_RETRIES} attempts (concurrent ingests?)")


def recover(spark: "SparkSession", output: Location) -> None:
    """Undo an interrupted :func:`commit`: when ``output`` is missing but a complete dataset was moved aside, move
    it back.  Only local paths can be listed cheaply; elsewhere this is a no-op."""
    if not output.is_local or storage.exists(spark, output):
        return
    parent = output.sibling("")
    prefix = f".{output.name}.old-"
    aside = sorted((e for e in os.scandir(parent.local_path) if e.name.startswith(prefix)),
                   key=lambda e: e.stat().st_mtime, reverse=True) if os.path.isdir(parent.local_path) else []
    for entry in aside:
        if os.path.exists(os.path.join(entry.path, contract.MANIFEST_NAME)):
            log.warning("%s: restoring the previous dataset left aside by an interrupted ingest", output.uri)
            os.rename(entry.path, output.local_path)
            return


def ingest(spark: "SparkSession", source: str, output: str, *, dataset: str = "fashion-mnist",
           num_shards: int = DEFAULT_NUM_SHARDS, row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
           strict: bool = False) -> dict[str, Any]:
    """Ingest the four standard gz IDX files of ``dataset`` under ``source`` into Parquet shards under ``output``.

    Runs on the driver.  ``source`` and ``output`` may be local paths, ``file:/``, ``dbfs:/``, ``/dbfs/`` or
    ``/Volumes/...`` (see :func:`spark_mnist.storage.normalize_uri`); ``source`` may also name a Keras
    ``mnist.npz`` file instead of a directory.

    Returns:
        The manifest written to ``output/_manifest.json``.
    Raises:
        InputError: (``SourceError``, ``IdxFormatError``, ``DatasetMismatchError``, ``ChecksumMismatchError``) bad
            input; nothing is written to ``output``.
        ValueError: ``num_shards`` or ``row_group_bytes`` below 1.
    """
    if num_shards < 1:
        raise InputError(f"Invalid num_shards: {num_shards!r}. Must be at least 1.")
    if row_group_bytes < 1:
        raise InputError(f"Invalid row_group_bytes: {row_group_bytes!r}. Must be at least 1.")
    spec = get_dataset(dataset)
    source_dir, out = normalize_uri(source), normalize_uri(output)
    started = time.perf_counter()
    if source_dir.uri.endswith(".npz"):
        splits, records = read_npz(spark, spec, source_dir)
    else:
        files = read_files(spark, source_dir, [f.name for f in spec.all_files()])
        splits, records = {}, []
        for split in SPLITS:
            splits[split], split_records = parse_split(spec, split, files)
            records.extend(split_records)
        del files
        check_hashes(spec, records, strict=strict)
    log.info("parsed %s in %.2fs: %s", source_dir.uri, time.perf_counter() - started,
             ", ".join(f"{s.name} {len(s.labels)} rows" for s in splits.values()))

    recover(spark, out)
    staging = out.sibling(f".{out.name}.staging-{uuid.uuid4().hex[:12]}")
    try:
        rows_per_shard = {name: write_split(spark, split, staging.join(name), num_shards, row_group_bytes)
                          for name, split in splits.items()}
        manifest = build_manifest(spec, source_dir, records, splits, rows_per_shard)
        storage.write_text(spark, staging.join(contract.MANIFEST_NAME), json.dumps(manifest, indent=2) + "\n")
        commit(spark, staging, out)
    finally:
        storage.delete(spark, staging)
    log.info("ingested %s into %s in %.2fs", spec.name, out.uri, time.perf_counter() - started)
    return manifest
