"""The ingest's one Spark write job per chunk, on the driver: the arrays travel to the tasks as one Arrow table of
fragments (a broadcast variable on a classic session, a relation over Spark Connect), and every task writes its own
shard with pyarrow (:func:`spark_mnist.tasks.write.write_shards`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from spark_mnist import fs
from spark_mnist.driver import session
from spark_mnist.driver.plan import DEFAULT_ROW_GROUP_BYTES, Piece, write_plan
from spark_mnist.paths import Location
from spark_mnist.shards import contract
from spark_mnist.tasks.write import REPORT_SCHEMA, WritePlan, write_broadcast_shards, write_shards

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["write_pieces", "fragments_table"]


def write_pieces(
    spark: "SparkSession",
    pieces: list[Piece],
    out: Location,
    generation: str,
    *,
    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
) -> dict[tuple[str, int], contract.ShardFile]:
    """Write every piece's shards with one Spark job: task ``t`` writes shard ``t`` of the job as
    ``out/<generation>/<split>/part-NNNNN.parquet``, in row groups of ~``row_group_bytes``.

    The arrays become one Arrow table of fragments (:func:`fragments_table`).  On Spark Connect it is a relation
    joined with a broadcast hint to ``spark.range(units)`` (one partition per shard), so partition ``t`` receives
    exactly shard ``t``'s rows; on a classic session it is a broadcast variable that each task of that
    ``spark.range`` filters for its unit (:func:`spark_mnist.tasks.write.write_broadcast_shards`).  Either way
    the tasks write with pyarrow and the driver commits the manifest later (mosaicml-streaming's
    ``dataframe_to_mds`` pattern), rather than through Spark's Parquet writer and Hadoop's output committer.  pyspark
    sends a relation under ``spark.sql.session.localRelationCacheThreshold`` (64 MiB) inline and uploads a larger
    one as chunked artifacts, so no gRPC message exceeds the server's limit (128 MiB).

    Returns:
        ``{(split, shard): ShardFile}`` of the shards written, with their bytes and rows as the tasks reported.
    Raises:
        RuntimeError: the job did not report every shard with its rows.
    """
    plan = write_plan(pieces, fs.task_uri(out), generation, row_group_bytes)
    table = fragments_table(pieces, plan)
    units = len(plan.units)
    tasks = spark.range(units, numPartitions=units)
    with contextlib.ExitStack() as stack:
        if session.is_connect(spark):
            tasks = tasks.withColumnRenamed("id", "unit").join(spark.createDataFrame(table).hint("broadcast"), "unit")
            write = functools.partial(write_shards, plan)
        else:  # a broadcast variable: warm ingest 1.05 s against the relation's 1.81 s (docs/benchmarks.md)
            shipped = stack.enter_context(session.shipped_to_executors(spark, table))
            write = functools.partial(write_broadcast_shards, plan, shipped)
        report = {row.unit: row for row in tasks.mapInArrow(write, REPORT_SCHEMA).collect()}
    rows = [hi - lo for lo, hi in map(plan.rows, range(units))]
    missing = [plan.path(u) for u in range(units) if u not in report or report[u].rows != rows[u]]
    if missing:
        raise RuntimeError(
            f"{out.shown}: the write job did not report these shards with their rows: {', '.join(missing)}"
        )
    return {plan.shards[u]: contract.ShardFile(plan.path(u), int(report[u].bytes), rows[u]) for u in range(units)}


def fragments_table(pieces: list[Piece], plan: WritePlan) -> pa.Table:
    """The job's arrays as an Arrow table of fragments: ``unit`` (long), ``part`` (int, the fragment's place in its
    unit), ``images`` and ``labels`` (binary: consecutive rows' raw bytes, C order), :attr:`WritePlan.fragment_rows`
    rows a fragment (fewer in a unit's last), without copying the arrays' bytes."""
    columns: dict[str, list[pa.Array]] = {"unit": [], "part": [], "images": [], "labels": []}
    for unit, (p, _) in enumerate(plan.units):
        lo, hi = plan.rows(unit)
        starts = np.append(np.arange(lo, hi, plan.fragment_rows), hi)
        n = len(starts) - 1
        columns["unit"].append(pa.array(np.full(n, unit, dtype=np.int64)))
        columns["part"].append(pa.array(np.arange(n, dtype=np.int32)))
        for name, array in (("images", pieces[p].images), ("labels", pieces[p].labels)):
            flat = np.ascontiguousarray(array[lo:hi]).reshape(-1).view(np.uint8)
            offsets = pa.py_buffer(((starts - lo) * (flat.size // max(1, hi - lo))).astype(np.int32))
            columns[name].append(pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(flat)]))
    # One chunk per column: Spark 4.0.0's Connect server reads only the first record batch of a local relation.
    return pa.table({name: pa.concat_arrays(arrays) for name, arrays in columns.items()})
