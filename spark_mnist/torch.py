"""The public loader API for your own training loop, on every rank under any launcher: ``spark_mnist.torch.loader``,
and ``spark_mnist.torch.MNIST``, a drop-in for torchvision's dataset class.  See docs/concepts/training.md.

Inside a function that torchrun, ``TorchDistributor`` or Databricks AI Runtime's ``@distributed`` runs once per
rank, :func:`loader` opens one split of an ingested dataset through its manifest (a local, ``/dbfs`` or ``/Volumes``
path, or an ``s3://``, ``gs://``, ``abfss://`` URI) and gives this rank's exact share of it, as uint8 batches::

    import spark_mnist.torch

    loader = spark_mnist.torch.loader("/Volumes/main/default/mnist/parquet/mnist", split="train", batch_size=128,
                                      seed=0)
    with loader:
        for epoch in range(epochs):
            for images, labels in loader:   # images: uint8 (B, 1, 28, 28); labels: int64 (B,)
                ...

Each ``iter()`` is the next epoch, reshuffled (no ``set_epoch`` needed); ``loader.set_epoch(e)`` still wins: the next
``iter()`` reads epoch ``e``, the one after ``e + 1``.

What it guarantees (:class:`spark_mnist.rank.loader.ShardLoader`; :mod:`spark_mnist.rank.order` defines the order):

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
  batch: the next iteration yields exactly the samples of the saved epoch not yet seen, the one after it the next
  epoch (so resume the loop at ``range(state["epoch"], epochs)``).
* **Batches.**  ``(images, labels)``: ``images`` ``torch.uint8`` of shape (B, 1, H, W), raw pixels 0..255 (pinned
  host memory with ``pin_memory``); ``labels`` ``torch.int64`` of shape (B,), class indices.  Scale and normalise
  on the device after the copy (:func:`spark_mnist.models.normalize`).
* **On the device.**  With ``device=``, the batches come on that device; when the split's decoded rows fit its
  budget they stay there (loaded once) and each batch is a gather on the device, in the same order, so a training
  step copies nothing (``loader.resident`` says which).
* **A DataLoader if you need one.**  The loader is a ``torch.utils.data.IterableDataset``:
  ``torch.utils.data.DataLoader(loader, batch_size=None)`` yields the same batches (as ``[images, labels]``).
  Leave ``num_workers`` at 0: the loader decodes in its own threads (a worker process refuses to iterate it).

For code written against ``torchvision.datasets.MNIST``, :class:`MNIST` (and :class:`FashionMNIST`, :class:`KMNIST`,
:class:`EMNIST`) takes the same arguments with ``root`` an ingested dataset, and returns the same items: a
map-style dataset of ``(PIL image, int)`` for ``DataLoader(..., shuffle=True)`` or a ``DistributedSampler``.  It
needs Pillow; torchvision is never imported.
"""

import os
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset as _TorchDataset

from spark_mnist.errors import DatasetMismatchError, InputError, check_choice, require_extra
from spark_mnist.paths import redact
from spark_mnist.rank.loader import DEFAULT_MEMORY_BUDGET_BYTES, ShardLoader
from spark_mnist.rank.world import World
from spark_mnist.runs import dataset_identity
from spark_mnist.shards.arrays import split_arrays
from spark_mnist.shards.contract import open_dataset
from spark_mnist.shards.parquet import DEFAULT_READER_THREADS

__all__ = ["loader", "World", "ShardLoader", "MNIST", "FashionMNIST", "KMNIST", "EMNIST"]


def loader(
    dataset: str | os.PathLike,
    split: str = "train",
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: Optional[bool] = None,
    drop_remainder: Optional[bool] = None,
    world: Optional[World] = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    reader_threads: int = DEFAULT_READER_THREADS,
    pin_memory: bool = False,
    device: torch.device | str | None = None,
    device_memory_budget_bytes: Optional[int] = None,
) -> ShardLoader:
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
        device: yield the batches on this device (e.g. ``f"cuda:{world.local_rank}"``); the rows this rank reads
            are then kept there when they fit ``device_memory_budget_bytes`` (read once, the first epoch; every
            batch an index gather on the device, in the same order), else each host batch is copied there
            (``non_blocking`` from pinned memory on CUDA) and a warning says so once.  ``None``: host batches.
        device_memory_budget_bytes: what the rows kept on ``device`` may take; default a quarter of a CUDA
            device's free memory, ``memory_budget_bytes`` on the CPU.
    Returns:
        A :class:`~spark_mnist.rank.loader.ShardLoader` (a ``torch.utils.data.IterableDataset``): each ``iter()``
        is one epoch of ``(images, labels)`` (uint8 (B, 1, H, W), int64 (B,)), the next epoch's order each time;
        ``len()`` is the steps the next ``iter()`` yields, ``set_epoch(e)`` picks the next epoch, ``state_dict()`` /
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
    return ShardLoader(
        opened.files(split),
        rank=world.rank,
        world_size=world.world_size,
        batch_size=batch_size,
        image_shape=(opened.image_shape[0], opened.image_shape[1]),
        seed=seed,
        shuffle=(split == "train") if shuffle is None else shuffle,
        drop_remainder=(split == "train") if drop_remainder is None else drop_remainder,
        memory_budget_bytes=memory_budget_bytes,
        reader_threads=reader_threads,
        pin_memory=pin_memory,
        dataset=dataset_identity(opened.manifest),
        device=device,
        device_memory_budget_bytes=device_memory_budget_bytes,
    )


class MNIST(_TorchDataset):
    """torchvision's ``MNIST`` over an ingested dataset: ``from spark_mnist.torch import MNIST`` replaces
    ``from torchvision.datasets import MNIST``.  It serves whichever registry dataset ``root`` holds (mnist,
    fashion-mnist, kmnist, the emnist splits); :class:`FashionMNIST`, :class:`KMNIST` and :class:`EMNIST` also
    check which.

    Args:
        root: the dataset directory ``OUT`` of ``spark-mnist ingest``: anything :func:`spark_mnist.open_dataset`
            opens (a local path, ``/dbfs/...``, ``/Volumes/...``, ``s3://``, ``gs://``, ``abfss://``).
        train: the ``"train"`` split, else ``"test"``.
        transform: applied to each PIL image (e.g. a ``ToTensor``).
        target_transform: applied to each target (an ``int``).
        download: accepted for torchvision's signature and ignored: nothing is downloaded, ``root`` must already
            be ingested.
    Attributes:
        data: ``torch.uint8`` of shape (N, H, W), the split's images in file order, upright (EMNIST too: unlike
            torchvision's, its images need no transposing transform).
        targets: ``torch.int64`` of shape (N,), class indices.
        classes: the manifest's class names, ``classes[i]`` for label ``i`` (e.g. ``"0"``..``"9"`` for mnist, not
            torchvision's ``"0 - zero"``); ``class_to_idx`` maps them back.
        train, root, transform, target_transform: as given; ``dataset``: the registry name ``root`` holds.

    ``len(ds)`` is N; ``ds[i]`` is ``(image, target)`` as torchvision builds it: ``image`` a ``PIL.Image.Image`` of
    mode ``"L"`` from ``data[i]``, then ``transform``; ``target`` ``int(targets[i])``, then ``target_transform``.
    The whole split is read into memory once, when the dataset is built.

    Raises:
        DatasetNotFoundError, SourceError: as :func:`spark_mnist.open_dataset`, for a ``root`` holding no complete
            dataset or on no file system here.
        DatasetMismatchError: ``root`` holds another dataset than the class serves (:class:`FashionMNIST`, ...).
        EnvironmentMismatchError: Pillow is not installed.
    """

    #: The registry names this class serves; ``None``: any.
    dataset_names: Optional[tuple[str, ...]] = None

    def __init__(
        self,
        root: str | os.PathLike,
        train: bool = True,
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
        download: bool = False,
    ) -> None:
        require_extra("PIL.Image", "torch", f"spark_mnist.torch.{type(self).__name__}")
        opened = open_dataset(root)
        self.dataset, self.classes = opened.dataset, list(opened.classes)
        if self.dataset_names is not None and self.dataset not in self.dataset_names:
            raise DatasetMismatchError(
                f"{redact(os.fspath(root))}: holds {self.dataset!r}, not {' or '.join(map(repr, self.dataset_names))} "
                f"({type(self).__name__}); spark_mnist.torch.MNIST serves any ingested dataset"
            )
        images, labels = split_arrays(opened, "train" if train else "test")
        self.root, self.train, self.transform, self.target_transform = root, train, transform, target_transform
        self.data, self.targets = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """``(image, target)``: a mode ``"L"`` PIL image of ``data[index]`` (then ``transform``) and
        ``int(targets[index])`` (then ``target_transform``).

        Raises:
            IndexError: ``index`` outside ``[-N, N)``.
        """
        from PIL import Image  # pillow: only MNIST's PIL images need it; the loader imports without it

        img: Any = Image.fromarray(self.data[index].numpy())  # 2-D uint8: mode "L" (fromarray's mode= is deprecated)
        target = int(self.targets[index])
        img = img if self.transform is None else self.transform(img)
        return img, (target if self.target_transform is None else self.target_transform(target))

    def __repr__(self) -> str:
        lines = [f"Dataset {type(self).__name__} ({self.dataset})", f"Number of datapoints: {len(self)}"]
        lines += [f"Root location: {redact(os.fspath(self.root))}", f"Split: {'Train' if self.train else 'Test'}"]
        transforms = {"Transform": self.transform, "Target transform": self.target_transform}
        lines += [f"{name}: {value!r}" for name, value in transforms.items() if value]
        return "\n    ".join(lines)


class FashionMNIST(MNIST):
    """:class:`MNIST` for a ``root`` holding fashion-mnist (torchvision's ``FashionMNIST``); another dataset raises
    ``DatasetMismatchError``."""

    dataset_names = ("fashion-mnist",)


class KMNIST(MNIST):
    """:class:`MNIST` for a ``root`` holding kmnist (torchvision's ``KMNIST``); another dataset raises
    ``DatasetMismatchError``."""

    dataset_names = ("kmnist",)


class EMNIST(MNIST):
    """:class:`MNIST` for a ``root`` holding EMNIST's ``split`` (torchvision's ``EMNIST(root, split, train)``), one
    of :attr:`splits`: the dataset ingested as ``emnist-{split}``; another dataset raises ``DatasetMismatchError``.
    Unlike torchvision's, the images are upright (ingest transposes EMNIST's column-major images back): drop any
    transposing transform.  ``letters`` keeps EMNIST's labels 1..26 (``classes[0]`` is ``"N/A"``), as torchvision.

    Raises:
        InputError: an unknown ``split``; and as :class:`MNIST`.
    """

    splits = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")

    def __init__(self, root: str | os.PathLike, split: str, *args: Any, **kwargs: Any) -> None:
        """``EMNIST(root, split, train=True, transform=None, target_transform=None, download=False)``: the
        arguments after ``split`` are :class:`MNIST`'s."""
        self.split = check_choice("split", split, self.splits, InputError)
        self.dataset_names = (f"emnist-{split}",)
        super().__init__(root, *args, **kwargs)
