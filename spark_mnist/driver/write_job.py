"""The ingest's write jobs, on the driver: the plan (shard boundaries, the Spark write jobs, each holding at most
``chunk_rows`` images on the driver, and what every write task needs, :class:`~spark_mnist.tasks.write.WritePlan`),
and one Spark job per chunk: the arrays travel to the tasks as one Arrow table of fragments (a broadcast variable on a
classic session, a relation over Spark Connect), and every task writes its shards with pyarrow
(:func:`spark_mnist.tasks.write.write_shards`).
"""

import bisect
import functools
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from spark_mnist import fs
from spark_mnist.driver import session
from spark_mnist.paths import Location
from spark_mnist.shards.contract import ShardFile, shard_bounds
from spark_mnist.tasks.write import REPORT_SCHEMA, WritePlan, write_from_broadcast, write_from_relation

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["FRAGMENT_BYTES", "plan_jobs", "Shard", "fragments_table", "write_pieces"]

# The arrays travel to the write tasks as rows of at most this many bytes of images (a row group's worth of an
# MNIST shard is ~1 MiB): serverless compute refuses local rows over 128 MiB.
FRAGMENT_BYTES = 4 * 2**20
# One shard to write: its path relative to OUT, its first global row, images (n, H, W) uint8 and labels (n,) uint8.
Shard = tuple[str, int, np.ndarray, np.ndarray]


def plan_jobs(rows: dict[str, int], num_shards: int, chunk_rows: int) -> tuple[dict[str, list[int]], list[list]]:
    """Shard boundaries per split (shard ``k`` is rows ``[b[k], b[k+1])``) and the Spark write jobs: each job a list
    of ``(split, first shard, end shard)``, consecutive shards of one split, holding at most ``chunk_rows`` rows (at
    least one shard).

    ``num_shards`` is raised where needed so that no shard exceeds ``chunk_rows``.  MNIST-sized datasets are one
    job; larger splits are read from their streams and written a chunk at a time.
    """
    bounds = {name: shard_bounds(n, max(num_shards, -(-n // chunk_rows))).tolist() for name, n in rows.items()}
    jobs: list[list] = [[]]
    for name, b in bounds.items():
        first = 0
        while first < len(b) - 1:  # the most consecutive shards within the chunk, at least one
            end = max(first + 1, bisect.bisect_right(b, b[first] + chunk_rows) - 1)
            if sum(bounds[s][e] - bounds[s][f] for s, f, e in [*jobs[-1], (name, first, end)]) > chunk_rows:
                jobs.append([])  # the group does not fit in this job: the next one
            jobs[-1].append((name, first, end))
            first = end
    return bounds, jobs


def fragments_table(shards: list[Shard], plan: WritePlan) -> pa.Table:
    """The job's arrays as an Arrow table of fragments, in unit order: ``unit`` (long), ``part`` (int, the fragment's
    place in its unit), ``images`` and ``labels`` (binary: consecutive rows' raw bytes, C order),
    :attr:`~spark_mnist.tasks.write.WritePlan.fragment_rows` rows a fragment (fewer in a unit's last)."""
    columns: dict[str, list[pa.Array]] = {"unit": [], "part": [], "images": [], "labels": []}
    for unit, (_, _, images, labels) in enumerate(shards):
        rows, n = len(labels), plan.fragments(unit)
        starts = np.minimum(np.arange(n + 1) * plan.fragment_rows, rows)
        columns["unit"].append(pa.array(np.full(n, unit, dtype=np.int64)))
        columns["part"].append(pa.array(np.arange(n, dtype=np.int32)))
        for name, array in (("images", images), ("labels", labels)):
            flat = np.ascontiguousarray(array).reshape(-1)
            offsets = pa.py_buffer((starts * (flat.size // max(1, rows))).astype(np.int32))
            columns[name].append(pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(flat)]))
    # One chunk per column: Spark 4.0.0's Connect server reads only the first record batch of a local relation.
    return pa.table({name: pa.concat_arrays(arrays) for name, arrays in columns.items()})


def write_pieces(
    spark: "SparkSession", shards: list[Shard], out: Location, *, row_group_bytes: int, tasks: int
) -> list[ShardFile]:
    """Write ``shards`` with one Spark job of at most ``tasks`` tasks: task ``t`` writes shards ``t``, ``t + tasks``,
    ... as ``out/<path>``, in row groups of ~``row_group_bytes``.

    The arrays become one Arrow table of fragments (:func:`fragments_table`).  On Spark Connect it is a relation
    joined with a broadcast hint to ``spark.range(tasks)`` (one partition a task) on ``id = unit % tasks``, so
    partition ``t`` receives exactly its shards' rows; on a classic session it is a broadcast variable that each task
    of an RDD of the task numbers slices for its units (:mod:`spark_mnist.tasks.write`).  Either way
    the tasks write with pyarrow and the driver commits the manifest later (mosaicml-streaming's
    ``dataframe_to_mds`` pattern), rather than through Spark's Parquet writer and Hadoop's output committer.  pyspark
    sends a relation under ``spark.sql.session.localRelationCacheThreshold`` (64 MiB) inline and uploads a larger
    one as chunked artifacts, so no gRPC message exceeds the server's limit (128 MiB).

    Returns:
        The :class:`~spark_mnist.shards.contract.ShardFile` of each shard, in order, with its bytes and rows as the
        tasks reported.
    Raises:
        RuntimeError: the job did not report every shard with its rows.
    """
    # One unit per shard, row groups of about row_group_bytes of images, fragments of at most FRAGMENT_BYTES of
    # images (at least one image).
    image_shape, image_bytes = shards[0][2].shape[1:], shards[0][2][0].nbytes  # (H, W) and bytes of one image
    units = tuple((path, start, len(labels)) for path, start, _, labels in shards)
    rows_per_group, fragment_rows = max(1, row_group_bytes // image_bytes), max(1, FRAGMENT_BYTES // image_bytes)
    # Fewer tasks than shards where asked: Spark's cost is per task.
    plan = WritePlan(fs.task_uri(out), units, image_shape, rows_per_group, fragment_rows, min(tasks, len(shards)))
    table = fragments_table(shards, plan)
    if session.is_connect(spark):  # no broadcast variables and no RDDs: the relation, joined to the tasks
        relation = spark.createDataFrame(table).hint("broadcast")
        job = spark.range(plan.tasks, numPartitions=plan.tasks)
        job = job.join(relation, job["id"] == relation["unit"] % plan.tasks)
        reports = job.mapInArrow(functools.partial(write_from_relation, plan), REPORT_SCHEMA).collect()
    else:
        # Classic: a broadcast variable, warm ingest 1.05 s against the relation's 1.81 s (docs/benchmarks.md), and an
        # RDD job, ~0.1 s against a mapInArrow job's ~0.2 s for two tasks that write nothing (docs/benchmarks.md).
        reports = session.broadcast_job(spark, table, plan.tasks, functools.partial(write_from_broadcast, plan))
    report = {unit: (rows, size) for unit, rows, size in reports}
    missing = [path for u, (path, _, rows) in enumerate(plan.shards) if report.get(u, (None, 0))[0] != rows]
    if missing:
        raise RuntimeError(
            f"{out.shown}: the write job did not report these shards with their rows: {', '.join(missing)}"
        )
    return [ShardFile(path, int(report[u][1]), rows) for u, (path, _, rows) in enumerate(plan.shards)]
