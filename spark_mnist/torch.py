"""The public loader API for your own training loop, under any launcher: ``spark_mnist.torch.loader``.

Inside a function that torchrun, ``TorchDistributor`` or Databricks AI Runtime's ``@distributed`` runs once per
rank, :func:`loader` opens one split of an ingested dataset through its manifest (a local, ``/dbfs`` or ``/Volumes``
path, or an ``s3://``, ``gs://``, ``abfss://`` URI) and gives this rank's exact share of it, as uint8 batches::

    import spark_mnist.torch

    loader = spark_mnist.torch.loader("/Volumes/main/default/mnist/parquet/mnist", split="train", batch_size=128,
                                      seed=0)
    with loader:
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for images, labels in loader:   # images: uint8 (B, 1, 28, 28); labels: int64 (B,)
                ...

What it guarantees (:class:`spark_mnist.rank.loader.ShardLoader`, whose docstring defines the order):

* **World from the environment.**  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``, which torchrun,
  ``TorchDistributor`` and the AI Runtime all set, read once (:class:`spark_mnist.rank.world.World`); a plain
  ``python`` process is rank 0 of 1.
* **Exact sharding.**  Training (``split="train"``): every rank runs the same number of full steps per epoch,
  ``(rows // world_size) // batch_size``, each sample at most once per epoch, reshuffled every epoch from ``seed``;
  the remainder (fewer than ``world_size * batch_size`` rows) is dropped.  Evaluation (``split="test"``): file
  order, every row exactly once across the ranks, a last short batch per rank.
* **Resume.**  ``loader.state_dict()`` is where the loader stands and what decides what comes next (seed, epoch,
  step, samples, world size, global batch size, the dataset's identity); save it in your checkpoint and
  ``loader.load_state_dict(state)`` after a restart, on the same or another number of ranks with the same global
  batch: the next iteration yields exactly the samples not yet seen.
* **Batches.**  ``(images, labels)``: ``images`` ``torch.uint8`` of shape (B, 1, H, W), raw pixels 0..255 (pinned
  host memory with ``pin_memory``); ``labels`` ``torch.int64`` of shape (B,), class indices.  Scale and normalise
  on the device after the copy (:func:`spark_mnist.models.normalize`).

This is the ``UCVolumeDataset`` of our format: no Spark on the GPU nodes, no second copy of the data.
"""

from __future__ import annotations

import os
from typing import Optional

from spark_mnist.rank.loader import DEFAULT_MEMORY_BUDGET_BYTES, ShardLoader
from spark_mnist.rank.world import World
from spark_mnist.runs import dataset_identity
from spark_mnist.shards.contract import open_dataset
from spark_mnist.shards.parquet import DEFAULT_READER_THREADS

__all__ = ["loader", "World"]


def loader(dataset: str | os.PathLike, split: str = "train", *, batch_size: int, seed: int = 0,
           shuffle: Optional[bool] = None, drop_remainder: Optional[bool] = None, world: Optional[World] = None,
           memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES, reader_threads: int = DEFAULT_READER_THREADS,
           pin_memory: bool = False) -> ShardLoader:
    """This rank's loader of one split of the ingested dataset at ``dataset``.

    Args:
        dataset: the dataset directory ``OUT`` of ``spark-mnist ingest`` / :func:`spark_mnist.ingest`: a local path,
            ``/dbfs/...``, ``dbfs:/...``, ``/Volumes/...`` or an object-store URI (:func:`spark_mnist.open_dataset`).
        split: ``"train"`` or ``"test"``.
        batch_size: samples per step, per rank (the global batch is ``batch_size * world_size``).
        seed: orders every epoch (with the epoch number); the same on every rank.
        shuffle: reshuffle every epoch; default ``True`` for ``"train"``, ``False`` for ``"test"``.
        drop_remainder: equal full steps on every rank (training); default ``True`` for ``"train"``, ``False``
            (every row once) for ``"test"``.
        world: this rank's place; default :meth:`World.from_env` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
        memory_budget_bytes: keep the rank's decoded share in memory when it fits (later epochs index it), else
            stream row groups every epoch.
        reader_threads: row groups decoded in parallel.
        pin_memory: batches in pinned host memory, for ``non_blocking`` copies to a GPU.
    Returns:
        A :class:`~spark_mnist.rank.loader.ShardLoader`: iterate it for ``(images, labels)`` (uint8 (B, 1, H, W),
        int64 (B,)); ``len()`` is the steps left in the epoch, ``set_epoch(e)`` picks the epoch, ``state_dict()`` /
        ``load_state_dict()`` save and restore the position; use it as a context manager (its exit stops its
        reader threads).
    Raises:
        DatasetNotFoundError: no complete dataset at ``dataset``, or a file its manifest names missing or resized.
        SourceError: a ``dataset`` on no file system this machine reaches.
        ValueError: an unknown ``split``, a ``batch_size`` below 1, an invalid rank environment.
    Source: Mosaic Streaming's ``StreamingDataset`` (state, world from the environment), Databricks AI Runtime's
    ``UCVolumeDataset``.
    """
    opened = open_dataset(dataset)
    world = world or World.from_env()
    training = split == "train"
    return ShardLoader(opened.files(split), rank=world.rank, world_size=world.world_size, batch_size=batch_size,
                       image_shape=tuple(opened.image_shape), seed=seed, shuffle=training if shuffle is None else shuffle,
                       drop_remainder=training if drop_remainder is None else drop_remainder,
                       memory_budget_bytes=memory_budget_bytes, reader_threads=reader_threads, pin_memory=pin_memory,
                       dataset=dataset_identity(opened.manifest))
