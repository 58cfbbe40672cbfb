"""The optional petastorm adapter: batches from petastorm's converter, in the shapes :class:`ShardLoader` yields.

Runs on every rank, when ``train.loader`` is ``petastorm``.  petastorm is imported only inside the functions that
need it, so this module imports where petastorm is not installed (Spark 4, pyarrow >= 15).
"""

import itertools
from typing import Generator

import numpy as np
import torch

from spark_mnist.rank.world import World
from spark_mnist.shards import contract

__all__ = ["petastorm_batches"]


def petastorm_batches(
    converter,
    *,
    world: World,
    batch_size: int,
    steps: int,
    image_shape: tuple[int, int] = (28, 28),
    batched: bool = False,
) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    """``steps`` batches from petastorm's ``make_torch_dataloader(cur_shard=world.rank, shard_count=world.world_size)``.

    petastorm shards by row group, so ranks may hold different numbers of rows; it reads with ``num_epochs=None``
    (endless) and this stops after ``steps``, so every rank still runs the same number of steps (the common
    Databricks pattern).

    Args:
        converter: petastorm's ``SparkDatasetConverter`` of the split (the contract's columns).
        world: this rank's shard (``rank``) and the number of shards (``world_size``).
        batch_size: samples per batch.
        steps: batches to yield.
        image_shape: (H, W) of the contract's image column.
        batched: use petastorm's ``BatchedDataLoader`` (``data_loader_fn``) instead of its ``DataLoader``.
    Yields:
        ``(images, labels)``: uint8 (B, 1, H, W) and int64 (B,), as :class:`spark_mnist.rank.loader.ShardLoader`.
    Raises:
        ImportError: petastorm is not installed.
    Source: petastorm ``spark/spark_dataset_converter.py`` ``make_torch_dataloader``.
    """
    # petastorm: optional (Spark 3.5 with pyarrow < 15 only); this module imports without it.
    from petastorm import TransformSpec
    from petastorm.pytorch import BatchedDataLoader, DataLoader

    fields = [contract.IMAGE, contract.LABEL]

    def to_arrays(frame):
        values = frame[contract.IMAGE].to_numpy()  # (n,) bytes objects, joined once
        pixels = np.frombuffer(b"".join(values), dtype=np.uint8)
        frame[contract.IMAGE] = list(pixels.reshape(len(values), 1, *image_shape))
        return frame[fields]

    image_field = (contract.IMAGE, np.uint8, (1, *image_shape), False)
    spec = TransformSpec(to_arrays, edit_fields=[image_field], selected_fields=fields)
    with converter.make_torch_dataloader(
        batch_size=batch_size,
        num_epochs=None,
        cur_shard=world.rank,
        shard_count=world.world_size,
        transform_spec=spec,
        workers_count=2,  # petastorm's reader threads
        data_loader_fn=BatchedDataLoader if batched else DataLoader,
    ) as loader:
        for batch in itertools.islice(loader, steps):
            yield batch[contract.IMAGE].to(torch.uint8), batch[contract.LABEL].to(torch.int64)
