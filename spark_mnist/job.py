"""The contract between the driver and the ranks: what a training job is.

The driver (:func:`spark_mnist.pipeline.train`) builds one :class:`TrainJob` and ``TorchDistributor`` hands it
to :func:`spark_mnist.rank.train.train_worker` in every rank.  Every setting comes from one
:class:`~spark_mnist.config.TrainSettings` object, carried whole: no default is restated here.  Beside it the job
carries the facts only the driver can derive (the files of each split, the dataset's classes and image shape, the
local run directory, petastorm's converter).

What the ranks leave for the driver (model, metrics, checkpoint, error reports) is the run directory's contract,
:mod:`spark_mnist.runs`.

Importable anywhere: no torch, no Spark.
"""

from dataclasses import dataclass, field

from spark_mnist.config import TrainSettings

__all__ = ["TrainJob"]


@dataclass
class TrainJob:
    """Everything a rank needs, picklable.

    Attributes:
        settings: the run's ``train`` settings (epochs, batch size, lr, seed, model, loader, ...), read by the ranks.
        train_files, test_files: the splits' Parquet files, local paths or ``file:``/``dbfs:`` URLs (the ingested
            shards, or petastorm's converter cache).
        dataset: the registry name of the ingested dataset (picks the normalisation constants).
        num_classes: classes of the dataset (the model's outputs).
        image_shape: (H, W) of the images, in pixels.
        run_dir: the local (or FUSE) path of ``settings.run_dir``: the run directory (:mod:`spark_mnist.runs`).
        train_converter: petastorm's converter of the training split when ``settings.loader`` is ``petastorm``.
        dataset_id: the dataset's identity (:func:`spark_mnist.runs.dataset_identity` of its manifest), which the
            checkpoint records so that ``resume`` refuses other data; ``None``: not checked.
    """

    settings: TrainSettings
    train_files: list[str]
    test_files: list[str]
    dataset: str
    num_classes: int
    image_shape: tuple[int, int]
    run_dir: str
    train_converter: object = field(default=None, repr=False)  # petastorm's, opaque here
    dataset_id: str | None = None
