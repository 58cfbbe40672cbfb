"""The write job's task side: each task receives its shards' rows as fragments, checks it has every one of a shard,
and writes the shard with pyarrow.  The driver plans and runs the job (:mod:`spark_mnist.driver.write_job`);
:class:`WritePlan` travels in the task's closure.
"""

from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa

from spark_mnist.shards.parquet import write_shard

__all__ = ["REPORT_SCHEMA", "WritePlan", "write_shards", "write_from_relation", "write_from_broadcast"]

# What each task reports over Spark Connect, one row per shard written.
REPORT_SCHEMA = "unit long, rows long, bytes long"
# A fragment's bytes: its column's data (uint8, the column's buffer, not a copy), start and end.
Span = tuple[np.ndarray, int, int]


class WritePlan(NamedTuple):
    """What every write task needs besides the rows, small enough to travel in its closure: the shards of one write
    job (unit ``u`` is ``shards[u]`` = (its path relative to ``target``, its first global row, its rows)), the image
    shape, the rows of a Parquet row group and of a fragment, and the job's ``tasks``: task ``t`` writes units
    ``t``, ``t + tasks``, ...."""

    target: str
    shards: tuple[tuple[str, int, int], ...]
    image_shape: tuple[int, ...]
    rows_per_group: int
    fragment_rows: int
    tasks: int

    def fragments(self, unit: int) -> int:
        """How many fragments of at most :attr:`fragment_rows` rows unit ``unit`` travels in."""
        return -(-self.shards[unit][2] // self.fragment_rows)


def _spans(column: pa.Array) -> list[Span]:
    """Each row of a binary column as a :data:`Span` of the column's own data buffer."""
    buffers = [buffer or b"" for buffer in column.buffers()]  # an empty column may have none
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(buffers[1], offset_type)[column.offset : column.offset + len(column) + 1]
    data = np.frombuffer(buffers[2], np.uint8)
    return [(data, lo, hi) for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _joined(spans: Sequence[Span]) -> np.ndarray:
    """The bytes of ``spans`` end to end: a view where they lie so in one buffer (a unit's fragments sent in order
    in one batch), else one copy."""
    if all(a[0] is b[0] and a[2] == b[1] for a, b in zip(spans, spans[1:])):
        return spans[0][0][spans[0][1] : spans[-1][2]]
    return np.concatenate([data[lo:hi] for data, lo, hi in spans])


def write_shards(plan: WritePlan, batches: Iterable[pa.RecordBatch]) -> Iterator[tuple[int, int, int]]:
    """From record batches of fragments (``unit`` long, ``part`` int, ``images`` and ``labels`` binary: consecutive
    rows' raw bytes, C order), write each unit's shard as ``target/<path>``
    (:func:`spark_mnist.shards.parquet.write_shard`), images (n, H, W) uint8, labels (n,) uint8, without copying the
    bytes through Python objects.

    Yields:
        ``(unit, rows, bytes)`` of each shard written: its unit, rows and file size.
    Raises:
        RuntimeError: the task did not receive every fragment of a unit (it writes no partial shard).
    """
    received: dict[int, list[tuple[int, Span, Span]]] = {}
    for batch in batches:
        units, parts = batch.column("unit").to_pylist(), batch.column("part").to_pylist()
        for unit, part, images, labels in zip(units, parts, *(_spans(batch.column(c)) for c in ("images", "labels"))):
            received.setdefault(unit, []).append((part, images, labels))
    for unit, fragments in sorted(received.items()):
        (path, start, _), (parts, images, labels) = plan.shards[unit], zip(*sorted(fragments, key=lambda f: f[0]))
        if list(parts) != list(range(plan.fragments(unit))):
            raise RuntimeError(f"{path}: the task received fragments {list(parts)}, not all {plan.fragments(unit)}")
        images, labels = _joined(images).reshape(-1, *plan.image_shape), _joined(labels)
        yield unit, len(labels), write_shard(plan.target, path, images, labels, start, plan.rows_per_group)


def write_from_relation(plan: WritePlan, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The ``mapInArrow`` function of the write job over Spark Connect: :func:`write_shards` of the task's rows of
    the relation, each report a :data:`REPORT_SCHEMA` row."""
    for unit, rows, size in write_shards(plan, batches):
        yield pa.RecordBatch.from_pydict({"unit": [unit], "rows": [rows], "bytes": [size]})


def write_from_broadcast(plan: WritePlan, shipped: Any, tasks: Iterable[int]) -> Iterator[tuple[int, int, int]]:
    """The ``mapPartitions`` function of the write job on a classic session: task ``t`` (the number its partition
    holds) writes units ``t``, ``t + plan.tasks``, ... (:func:`write_shards`) from ``shipped.value``, the job's whole
    table of fragments in unit order (a broadcast variable), as slices of it (no copy)."""
    table = shipped.value
    first = np.searchsorted(table["unit"].to_numpy(), np.arange(len(plan.shards) + 1))  # each unit's first row
    units = [unit for t in tasks for unit in range(t, len(plan.shards), plan.tasks)]
    return write_shards(plan, [b for u in units for b in table.slice(first[u], first[u + 1] - first[u]).to_batches()])
