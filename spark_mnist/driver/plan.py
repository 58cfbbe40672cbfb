"""The ingest's plan, on the driver: shard boundaries, the Spark write jobs (each holding at most ``chunk_rows``
images on the driver), the pieces of a job and what every write task needs
(:class:`~spark_mnist.tasks.write.WritePlan`).  Pure: no Spark, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spark_mnist.shards import contract
from spark_mnist.shards.contract import shard_bounds
from spark_mnist.tasks.write import WritePlan

__all__ = ["DEFAULT_ROW_GROUP_BYTES", "DEFAULT_CHUNK_ROWS", "FRAGMENT_BYTES", "chunk_groups", "plan_jobs", "Piece",
           "write_plan"]  # fmt: skip

DEFAULT_ROW_GROUP_BYTES = contract.ROW_GROUP_BYTES
# Images held on the driver at once while ingesting: 1M MNIST images are ~750 MiB.
DEFAULT_CHUNK_ROWS = 1_000_000
# The arrays travel to the write tasks as rows of at most this many bytes of images (a row group's worth of an
# MNIST shard is ~1 MiB): serverless compute refuses local rows over 128 MiB.
FRAGMENT_BYTES = 4 * 2**20


def chunk_groups(bounds: np.ndarray, chunk_rows: int) -> list[tuple[int, int]]:
    """Consecutive shards grouped so that each group holds at most ``chunk_rows`` rows (at least one shard):
    ``[(first shard, end shard), ...]``.  A streamed split is read and written one group at a time."""
    groups, k, shards = [], 0, len(bounds) - 1
    while k < shards:
        end = k + 1
        while end < shards and bounds[end + 1] - bounds[k] <= chunk_rows:
            end += 1
        groups.append((k, end))
        k = end
    return groups


def plan_jobs(
    rows: dict[str, int], num_shards: int, chunk_rows: int
) -> tuple[dict[str, np.ndarray], list[list[tuple[str, int, int]]]]:
    """Shard boundaries per split and the Spark write jobs: each job a list of ``(split, first shard, end shard)``
    holding at most ``chunk_rows`` rows (at least one shard).

    ``num_shards`` is raised where needed so that no shard exceeds ``chunk_rows``.  MNIST-sized datasets are one
    job; larger splits are read from their streams and written a chunk at a time.
    """
    bounds = {name: shard_bounds(n, max(num_shards, -(-n // chunk_rows))) for name, n in rows.items()}
    jobs: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] = []
    current_rows = 0
    for name, split_bounds in bounds.items():
        for first, end in chunk_groups(split_bounds, chunk_rows):
            group_rows = int(split_bounds[end] - split_bounds[first])
            if current and current_rows + group_rows > chunk_rows:
                jobs.append(current)
                current, current_rows = [], 0
            current.append((name, first, end))
            current_rows += group_rows
    if current:
        jobs.append(current)
    return bounds, jobs


@dataclass(frozen=True)
class Piece:
    """Consecutive shards of one split, in memory: shard ``first_shard + k`` holds global rows
    ``[bounds[k], bounds[k+1])``; ``images`` (n, H, W) uint8 and ``labels`` (n,) hold rows ``bounds[0] ..
    bounds[-1]``."""

    split: str
    first_shard: int
    bounds: tuple[int, ...]
    images: np.ndarray
    labels: np.ndarray


def write_plan(pieces: list[Piece], target: str, generation: str, row_group_bytes: int) -> WritePlan:
    """The plan of one write job over ``pieces`` into ``target`` (``OUT``'s URI or local path) under
    ``generation``: one unit per shard, row groups of about ``row_group_bytes`` of images, fragments of at most
    :data:`FRAGMENT_BYTES` of images (at least one image)."""
    units = tuple((p, k) for p, piece in enumerate(pieces) for k in range(len(piece.bounds) - 1))
    image_shape = tuple(int(n) for n in pieces[0].images.shape[1:])
    image_bytes = max(1, int(np.prod(image_shape)))
    return WritePlan(
        target=target,
        generation=generation,
        units=units,
        shards=tuple((pieces[p].split, pieces[p].first_shard + k) for p, k in units),
        bounds=tuple(piece.bounds for piece in pieces),
        rows_per_group=max(1, row_group_bytes // image_bytes),
        image_shape=image_shape,
        label_dtypes=tuple(piece.labels.dtype.str for piece in pieces),
        fragment_rows=max(1, FRAGMENT_BYTES // image_bytes),
    )
