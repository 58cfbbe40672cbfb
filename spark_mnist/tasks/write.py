"""The write job's task side: each task receives its shard's rows as fragments, checks it has every one, and writes
the shard with pyarrow.  The driver plans the job (:mod:`spark_mnist.driver.plan`) and runs it
(:mod:`spark_mnist.driver.write_job`); :class:`WritePlan` travels in the task's closure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spark_mnist.shards import contract
from spark_mnist.shards.parquet import write_shard

__all__ = ["REPORT_SCHEMA", "WritePlan", "write_shards", "write_broadcast_shards"]

# What each task reports, one row per shard written.
REPORT_SCHEMA = "unit long, rows long, bytes long"


@dataclass(frozen=True)
class WritePlan:
    """What every write task needs besides the rows, small enough to travel in its closure: the shards of one write
    job (unit ``u`` is shard ``shards[u]`` = rows ``[bounds[p][k], bounds[p][k+1])`` of piece ``p``, where
    ``(p, k) = units[u]``), where and how to write them, and the rows of a fragment."""

    target: str
    generation: str
    units: tuple[tuple[int, int], ...]
    shards: tuple[tuple[str, int], ...]
    bounds: tuple[tuple[int, ...], ...]
    rows_per_group: int
    image_shape: tuple[int, ...]
    label_dtypes: tuple[str, ...]
    fragment_rows: int

    def rows(self, unit: int) -> tuple[int, int]:
        """Unit ``unit``'s rows ``[lo, hi)``, relative to the first row of its piece."""
        p, k = self.units[unit]
        return self.bounds[p][k] - self.bounds[p][0], self.bounds[p][k + 1] - self.bounds[p][0]

    def fragments(self, unit: int) -> int:
        """How many fragments of at most :attr:`fragment_rows` rows unit ``unit`` travels in."""
        lo, hi = self.rows(unit)
        return -(-(hi - lo) // self.fragment_rows)

    def path(self, unit: int) -> str:
        """Unit ``unit``'s shard, relative to ``OUT`` (:func:`spark_mnist.shards.contract.shard_path`)."""
        split, shard = self.shards[unit]
        return contract.shard_path(self.generation, split, shard)


def write_shards(plan: WritePlan, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The ``mapInArrow`` function of the write job: from record batches of fragments (``unit`` long, ``part`` int,
    ``images`` and ``labels`` binary: consecutive rows' raw bytes, C order), write each unit's shard as
    ``target/<generation>/<split>/part-NNNNN.parquet`` (:func:`spark_mnist.shards.parquet.write_shard`), images
    (n, H, W) uint8, labels (n,) of the piece's dtype.

    Yields:
        One report row per shard, :data:`REPORT_SCHEMA`: its unit, rows and file size.
    Raises:
        RuntimeError: the task did not receive every fragment of a unit (it writes no partial shard).
    """
    received: dict[int, list[tuple[int, bytes, bytes]]] = {}
    for batch in batches:
        columns = [batch.column(name).to_pylist() for name in ("unit", "part", "images", "labels")]
        for unit, part, images, labels in zip(*columns):
            received.setdefault(unit, []).append((part, images, labels))
    for unit, fragments in sorted(received.items()):
        fragments.sort(key=lambda fragment: fragment[0])
        parts, expected = [part for part, _, _ in fragments], plan.fragments(unit)
        if parts != list(range(expected)):
            raise RuntimeError(f"{plan.path(unit)}: the task received fragments {parts}, not all {expected}")
        p, k = plan.units[unit]
        images = np.frombuffer(b"".join(f[1] for f in fragments), np.uint8).reshape(-1, *plan.image_shape)
        labels = np.frombuffer(b"".join(f[2] for f in fragments), np.dtype(plan.label_dtypes[p]))
        size = write_shard(plan.target, plan.path(unit), images, labels, plan.bounds[p][k], plan.rows_per_group)
        yield pa.RecordBatch.from_pydict({"unit": [unit], "rows": [len(labels)], "bytes": [size]})


def write_broadcast_shards(
    plan: WritePlan, shipped: Any, batches: Iterator[pa.RecordBatch]
) -> Iterator[pa.RecordBatch]:
    """The ``mapInArrow`` function of the classic session's write job: ``batches`` carry the task's units (``id``
    long, ``spark.range``), ``shipped.value`` is the job's whole table of fragments (a broadcast variable); writes
    those units' shards as :func:`write_shards` does, with its reports and errors."""
    units = pa.array([unit for batch in batches for unit in batch.column(0).to_pylist()], pa.int64())
    table = shipped.value
    yield from write_shards(plan, iter(table.filter(pc.is_in(table["unit"], value_set=units)).to_batches()))
