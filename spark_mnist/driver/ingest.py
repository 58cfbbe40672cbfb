"""Driver-side ingest: gz IDX bytes -> validated numpy arrays -> Parquet shards of a new generation -> the manifest.

The order of work is what makes bad input cheap and failures harmless:

1. read the four files' bytes with Spark's ``binaryFile`` source (:mod:`spark_mnist.driver.inputs`);
2. parse and check every file on the driver (:mod:`spark_mnist.driver.inputs`, :mod:`spark_mnist.formats.idx`,
   :func:`spark_mnist.datasets.validate_split`), before anything is written;
3. plan the shards and write jobs and write both splits under a new generation ``OUT/<generation>/`` with one Spark
   job per chunk, each task writing one shard of each split (:mod:`spark_mnist.driver.write_job`);
4. commit: write ``OUT/_manifest.json`` last, in one single-object write, then remove the generations no manifest
   needs (:mod:`spark_mnist.shards.commit`).

Readers see either the previous complete dataset or the new one, never a mix, on local disk, FUSE mounts and object
stores alike; no directory is ever renamed.  The layout is the contract in :mod:`spark_mnist.shards.contract`;
the protocol and why: docs/concepts/dataset.md.
"""

import contextlib
import logging
import time
from typing import TYPE_CHECKING

from spark_mnist import fs
from spark_mnist.datasets import SPLITS, get_dataset, hash_mismatch_message, upright
from spark_mnist.driver import session
from spark_mnist.driver.inputs import open_idx_split, read_files, read_npz
from spark_mnist.driver.write_job import plan_jobs, write_pieces
from spark_mnist.errors import ChecksumMismatchError, InputError, SourceError, invalid
from spark_mnist.paths import normalize_uri, redact
from spark_mnist.shards import commit, contract

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["DEFAULT_CHUNK_ROWS", "ingest"]

log = logging.getLogger(__name__)

# Images held on the driver at once while ingesting: 1M MNIST images are ~750 MiB.
DEFAULT_CHUNK_ROWS = 1_000_000


def ingest(
    spark: "SparkSession",
    source: str,
    output: str,
    *,
    dataset: str = "fashion-mnist",
    num_shards: int | None = None,
    row_group_bytes: int = contract.ROW_GROUP_BYTES,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    strict: bool = False,
) -> contract.Manifest:
    """Ingest the four standard gz IDX files of ``dataset`` under ``source`` into Parquet shards under ``output``.

    Runs on the driver.  ``source`` and ``output`` may be local paths, ``file:/``, ``dbfs:/``, ``/dbfs/`` or
    ``/Volumes/...`` (see :func:`spark_mnist.paths.normalize_uri`); ``source`` may also name a Keras
    ``mnist.npz`` file instead of a directory.  Images are streamed: the driver holds at most ``chunk_rows``
    decompressed images at a time (plus all labels), so datasets far larger than its memory ingest.

    ``num_shards`` (per split) defaults to Spark's default parallelism, one shard per core.  Ranks are fed from
    row groups (``row_group_bytes``, ~1,300 MNIST rows), not shards, so few shards cost the loader nothing.

    Structure, shapes, counts and labels are checked before anything is written.  The shards go to a new generation
    under ``output`` and the manifest is written last (:mod:`spark_mnist.shards.commit`); a defect found later in a
    streamed file (truncation, a bad gzip CRC), a hash mismatch under ``strict`` or a failed write job discards the
    generation, so ``output`` goes on holding what it held (nothing, where this ingest created it).

    Returns:
        The manifest published (:class:`~spark_mnist.shards.contract.Manifest`): of racing ingests into one
        ``output``, the last manifest write wins.
    Raises:
        InputError: (``SourceError``, ``IdxFormatError``, ``DatasetMismatchError``, ``ChecksumMismatchError``) bad
            input; nothing is written to ``output``.
        InputError: ``num_shards``, ``row_group_bytes`` or ``chunk_rows`` below 1.
        SourceError: an ``output`` the write tasks cannot open with pyarrow (e.g. ``wasbs://``).
        OSError: the ingest took longer than :data:`~spark_mnist.shards.commit.RETENTION_S`; nothing was
            published.
    """
    # By default one shard per Spark core: the write is one wave of tasks, and Spark's cost is per task.
    num_shards = session.default_parallelism(spark) if num_shards is None else num_shards
    for name, value in (("num_shards", num_shards), ("row_group_bytes", row_group_bytes), ("chunk_rows", chunk_rows)):
        if value < 1:
            raise invalid(name, value, "at least 1", InputError)
    started = time.perf_counter()
    spec, source_dir, out = get_dataset(dataset), normalize_uri(source), normalize_uri(output)
    if out.local_path is None:  # an OUT the write tasks could not open with pyarrow is refused before reading
        try:
            fs.filesystem(out)
        except (SourceError, ValueError, NotImplementedError, OSError) as e:
            raise SourceError(
                f"{out.shown}: cannot write Parquet shards there ({redact(str(e))}); use a local "
                f"path, dbfs:/..., /dbfs/..., /Volumes/... or an s3://, gs://, abfss:// or hdfs:// URI"
            ) from None
    with contextlib.ExitStack() as stack:
        # Both splits, checked as far as headers and labels allow; images files stay open as streams on the stack.
        if source_dir.uri.endswith(".npz"):
            splits, records = read_npz(spark, spec, source_dir)
        else:
            sources = read_files(spark, source_dir, [f.name for f in spec.all_files()])
            splits, records = {split: open_idx_split(stack, spec, split, sources) for split in SPLITS}, []
        counts = ", ".join(f"{name} {len(split.labels)} rows" for name, split in splits.items())
        log.info("checked the headers and labels of %s: %s", source_dir.shown, counts)
        lease = stack.enter_context(commit.writing(out))  # a new generation; discarded on a failure
        bounds, jobs = plan_jobs({name: len(split.labels) for name, split in splits.items()}, num_shards, chunk_rows)
        written: list[contract.ShardFile] = []
        for job in jobs:  # contiguous shards, at most chunk_rows images on the driver at a time
            shards = []
            for name, first, end in job:
                for k in range(first, end):
                    rows, split = slice(bounds[name][k], bounds[name][k + 1]), splits[name]
                    path = contract.shard_path(lease.generation, name, k)
                    shards.append((path, rows.start, upright(spec, split.take(rows)), split.labels[rows]))
            # One task a shard of each split: one task a core by default.
            written += write_pieces(spark, shards, out, row_group_bytes=row_group_bytes, tasks=num_shards)
            log.info("wrote %s", ", ".join(f"{name} rows {bounds[name][a]}-{bounds[name][b]}" for name, a, b in job))
        records += [record for split in splits.values() for record in split.done()]
        for record in [record for record in records if record["sha256_matches"] is False]:
            # A subset or a relabelled copy is legitimate input: a warning, unless strict.
            message = hash_mismatch_message(spec.name, record["uri"], record["sha256"], record["expected_sha256"])
            if strict:
                raise ChecksumMismatchError(message + " (ingest.strict)")
            log.warning("%s; ingesting it anyway (ingest.strict refuses it)", message)
        labels = {name: split.labels for name, split in splits.items()}
        manifest = commit.publish(out, lease, spec, labels, written, {"uri": source_dir.shown, "files": records})
    log.info("ingested %s into %s in %.2fs", spec.name, out.shown, time.perf_counter() - started)
    return manifest
