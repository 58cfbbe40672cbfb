"""The ingest's one Spark write job per chunk, on the driver: every task writes its own shard with pyarrow
(:meth:`spark_mnist.driver.plan.WritePlan.write`), the arrays reaching the tasks as a broadcast (classic), read again
from the sources (Spark Connect, one job) or as an Arrow relation (Spark Connect otherwise).
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from spark_mnist import fs
from spark_mnist.datasets import DatasetSpec, upright
from spark_mnist.driver import session
from spark_mnist.driver.plan import DEFAULT_ROW_GROUP_BYTES, Piece, WritePlan
from spark_mnist.driver.sources import read_rows
from spark_mnist.errors import SourceError
from spark_mnist.paths import Location
from spark_mnist.shards import contract

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

REPORT_SCHEMA = "unit long, rows long, bytes long"


def rows_again(spec: DatasetSpec, uri: str, lo: int, hi: int) -> np.ndarray:
    """Images ``[lo, hi)`` of the IDX file ``uri`` in a Spark task, as the driver holds them: read again
    (:func:`spark_mnist.driver.sources.read_rows`) and stored upright (:func:`spark_mnist.datasets.upright`)."""
    return upright(spec, read_rows(uri, lo, hi))


def images_checksum(images: np.ndarray) -> int:
    """CRC-32 of ``images``' bytes in C order: what a task that read its rows again compares with the driver's."""
    return zlib.crc32(np.ascontiguousarray(images).data)


def write_pieces(
    spark: "SparkSession",
    pieces: list[Piece],
    out: Location,
    generation: str,
    *,
    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
) -> dict[tuple[str, int], contract.ShardFile]:
    """Write every piece's shards with one Spark job: task ``t`` writes shard ``t`` of the job as
    ``out/<generation>/<split>/part-NNNNN.parquet`` (:meth:`WritePlan.write`).

    Each task cuts its shard into Arrow record batches (no row passes through Python one at a time) and writes them
    with pyarrow, one row group of ~``row_group_bytes`` each.  Each task writes its own part and the driver commits
    the manifest later, the pattern of mosaicml-streaming's ``dataframe_to_mds``: Spark's own Parquet writer would
    convert every row from Arrow to its row format and run Hadoop's output committer, which measured here doubled
    the time of the whole write.  Spark's cost is per job and per task, so all pieces share one job and each shard
    is one task.  How the arrays reach the tasks depends on the session:

    * classic: once, as a broadcast variable (:func:`spark_mnist.driver.session.shipped_to_executors`), under
      ``spark.range(units)`` with one partition per shard;
    * Spark Connect (no broadcast variables, no JVM), where the rows can be read again from IDX files (one write
      job): not at all; each task of that same ``spark.range`` reads its rows from the source file and checks them
      against the driver's CRC-32 (:func:`_write_from_sources`);
    * Spark Connect otherwise (a Keras npz, or several write jobs): as one Arrow relation (``createDataFrame``) of
      rows of at most :data:`~spark_mnist.driver.plan.FRAGMENT_BYTES` of images, joined with a broadcast hint to
      that same ``spark.range``, so partition ``t`` again receives exactly shard ``t``'s rows
      (:func:`_write_over_connect`).  pyspark sends a relation under
      ``spark.sql.session.localRelationCacheThreshold`` (64 MiB) inline and uploads a larger one as chunked
      artifacts, so no gRPC message exceeds the server's limit (128 MiB).

    Returns:
        ``{(split, shard): ShardFile}`` of the shards written, with their bytes and rows as the tasks reported.
    Raises:
        RuntimeError: the job did not report every shard with its rows.
    """
    plan = WritePlan.of(pieces, fs.task_uri(out), generation, row_group_bytes)
    if session.is_connect(spark) and all(piece.reread is not None for piece in pieces):
        written = _write_from_sources(spark, pieces, plan)
    elif session.is_connect(spark):
        written = _write_over_connect(spark, pieces, plan)
    else:
        written = _write_with_broadcast(spark, pieces, plan)
    expected = plan.expected()
    reported = {row.unit: (row.rows, row.bytes) for row in written}
    missing = [plan.path(u) for u in range(len(plan.units)) if reported.get(u, (None,))[0] != expected[u]]
    if missing:
        raise RuntimeError(
            f"{out.shown}: the write job did not report these shards with their rows: {', '.join(missing)}"
        )
    return {
        plan.shards[u]: contract.ShardFile(plan.path(u), int(reported[u][1]), int(reported[u][0]))
        for u in range(len(plan.units))
    }


def _units_frame(spark: "SparkSession", plan: WritePlan):
    """``spark.range`` over the job's units, one partition each: the write job's tasks."""
    return spark.range(len(plan.units), numPartitions=len(plan.units))


def _write_with_broadcast(spark: "SparkSession", pieces: list[Piece], plan: WritePlan) -> list:
    """The classic session's write job: the arrays as one broadcast variable, the units as ``spark.range``."""
    with session.shipped_to_executors(spark, [(piece.images, piece.labels) for piece in pieces]) as shipped:

        def write_units(batches: Iterator) -> Iterator:
            import pyarrow as pa

            arrays = shipped.value
            for batch in batches:
                for unit in batch.column(0).to_pylist():
                    images, labels = arrays[plan.units[unit][0]]
                    lo, hi = plan.rows(unit)
                    yield pa.RecordBatch.from_pydict(plan.write(unit, images[lo:hi], labels[lo:hi]))

        return _units_frame(spark, plan).mapInArrow(write_units, REPORT_SCHEMA).collect()


def _write_from_sources(spark: "SparkSession", pieces: list[Piece], plan: WritePlan) -> list:
    """The Spark Connect write job where every piece can be read again (:attr:`Piece.reread`): nothing but the
    labels and a CRC-32 per shard travel; each task of ``spark.range(units)`` reads its rows from the source file,
    checks them against the driver's checksum, and writes its shard.

    Raises (in the job):
        SourceError: a task's rows differ from the driver's (the file changed since it was checked).
    """
    rereads = [piece.reread for piece in pieces if piece.reread is not None]
    if len(rereads) != len(pieces):
        raise ValueError("every piece must be readable again from its source (Piece.reread)")
    labels = [piece.labels for piece in pieces]
    checksums = []
    for unit, (p, _) in enumerate(plan.units):
        lo, hi = plan.rows(unit)
        checksums.append(images_checksum(pieces[p].images[lo:hi]))

    def write_units(batches: Iterator) -> Iterator:
        import pyarrow as pa

        for batch in batches:
            for unit in batch.column(0).to_pylist():
                p, k = plan.units[unit]
                lo, hi = plan.rows(unit)
                images = rereads[p](plan.bounds[p][k], plan.bounds[p][k + 1])
                if images_checksum(images) != checksums[unit]:
                    raise SourceError(
                        f"{plan.path(unit)}: rows {plan.bounds[p][k]}-"
                        f"{plan.bounds[p][k + 1]} of the source differ from what the driver checked "
                        f"(the file changed during the ingest?)"
                    )
                yield pa.RecordBatch.from_pydict(plan.write(unit, images, labels[p][lo:hi]))

    return _units_frame(spark, plan).mapInArrow(write_units, REPORT_SCHEMA).collect()


def fragments_table(pieces: list[Piece], plan: WritePlan):
    """The job's arrays as an Arrow table of fragments: ``unit`` (long), ``part`` (int, the fragment's place in its
    unit), ``images`` and ``labels`` (binary: consecutive rows' raw bytes, C order), :attr:`WritePlan.fragment_rows`
    rows a fragment (fewer in a unit's last), in one record batch."""
    import pyarrow as pa

    units: list[Any] = []
    parts: list[Any] = []
    images: list[Any] = []
    labels: list[Any] = []
    for unit, (p, _) in enumerate(plan.units):
        lo, hi = plan.rows(unit)
        starts = np.append(np.arange(lo, hi, plan.fragment_rows), hi)
        units.append(pa.array(np.full(len(starts) - 1, unit, dtype=np.int64)))
        parts.append(pa.array(np.arange(len(starts) - 1, dtype=np.int32)))
        for _name, array, out in (("images", pieces[p].images, images), ("labels", pieces[p].labels, labels)):
            flat = np.ascontiguousarray(array[lo:hi]).reshape(-1).view(np.uint8)
            width = flat.size // max(1, hi - lo)
            offsets = pa.py_buffer(((starts - lo) * width).astype(np.int32))
            out.append(pa.Array.from_buffers(pa.binary(), len(starts) - 1, [None, offsets, pa.py_buffer(flat)]))
    # One chunk per column: Spark 4.0.0's Connect server reads only the first record batch of a local relation.
    return pa.Table.from_arrays(
        [pa.concat_arrays(c) for c in (units, parts, images, labels)], names=["unit", "part", "images", "labels"]
    )


def _write_over_connect(spark: "SparkSession", pieces: list[Piece], plan: WritePlan) -> list:
    """The Spark Connect write job: the arrays as one Arrow relation of fragments (:func:`fragments_table`),
    broadcast-joined to the units, so task ``t`` gets all of unit ``t``'s fragments; it checks it has every one
    (a unit split across tasks fails the job rather than writing a partial shard) and writes the shard."""
    data = spark.createDataFrame(fragments_table(pieces, plan))
    tasks = (
        _units_frame(spark, plan)
        .withColumnRenamed("id", "unit")
        .join(data.hint("broadcast"), "unit")
        .select("unit", "part", "images", "labels")
    )

    def write_fragments(batches: Iterator) -> Iterator:
        import pyarrow as pa

        received: dict[int, list[tuple[int, bytes, bytes]]] = {}
        for batch in batches:
            columns = [batch.column(name).to_pylist() for name in ("unit", "part", "images", "labels")]
            for unit, part, images, labels in zip(*columns):
                received.setdefault(unit, []).append((part, images, labels))
        for unit, fragments in sorted(received.items()):
            fragments.sort(key=lambda fragment: fragment[0])
            parts = [part for part, _, _ in fragments]
            if parts != list(range(plan.fragments(unit))):
                raise RuntimeError(
                    f"{plan.path(unit)}: the task received fragments {parts}, not all {plan.fragments(unit)}"
                )
            images = np.frombuffer(b"".join(f[1] for f in fragments), np.uint8).reshape(-1, *plan.image_shape)
            labels = np.frombuffer(b"".join(f[2] for f in fragments), np.dtype(plan.label_dtypes[plan.units[unit][0]]))
            yield pa.RecordBatch.from_pydict(plan.write(unit, images, labels))

    return tasks.mapInArrow(write_fragments, REPORT_SCHEMA).collect()
