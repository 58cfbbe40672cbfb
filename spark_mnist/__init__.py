"""spark-mnist: gz IDX files -> Spark -> Parquet shards -> a rank-aware PyTorch DDP loader, for Databricks.

The subpackages follow the pipeline and say where their code runs (driver, Spark task, launcher, rank);
docs/concepts/architecture.md names each module's job.

The notebook API, with the settings of the command line (``spark_mnist/config.py``):

* :func:`ingest` ``(spark, source, output, ...)``: gz IDX files -> Parquet shards; returns the manifest.
* :func:`train` ``(data, ..., launcher=...)``: training on an ingested dataset; returns the metrics.
* :func:`load_data` ``(path)``: Keras-style numpy arrays (:mod:`spark_mnist.shards.arrays`).
* :func:`open_dataset` ``(OUT)``: an ingested dataset through its manifest, the one way in for every reader
  (``spark.read.parquet(*open_dataset(OUT).files("train"))``; :mod:`spark_mnist.shards.contract`).
* :mod:`spark_mnist.torch`: the loader for your own training loop, and ``MNIST`` (and its siblings) in
  torchvision's shape.
* The errors: every bad input is an :class:`InputError` (exit code 2 on the command line), whose subclasses name
  what is wrong; :class:`TrainingFailedError` is a rank's failure after ``max_restarts`` relaunches.

Importing the package imports neither Spark nor torch.
"""

import importlib.metadata as _metadata
import os
from typing import TYPE_CHECKING, Any

from spark_mnist.errors import (
    CheckpointError,
    ChecksumMismatchError,
    DatasetMismatchError,
    DatasetNotFoundError,
    EnvironmentMismatchError,
    IdxFormatError,
    InputError,
    LauncherUnavailableError,
    LoaderStateError,
    SourceError,
)
from spark_mnist.runs import TrainingFailedError

if TYPE_CHECKING:
    from spark_mnist.shards.contract import Manifest

__all__ = ["CheckpointError", "ChecksumMismatchError", "DatasetMismatchError", "DatasetNotFoundError",
           "EnvironmentMismatchError", "IdxFormatError", "InputError", "LauncherUnavailableError", "LoaderStateError",
           "SourceError", "TrainingFailedError", "__version__", "ingest", "load_data", "open_dataset",
           "train"]  # fmt: skip

try:  # the version is defined once, in pyproject.toml: the installed package's metadata
    __version__ = _metadata.version("spark-mnist")
except _metadata.PackageNotFoundError:  # the source tree on sys.path without an install
    __version__ = "0+unknown"


# The functions below import the layers they call when called: `import spark_mnist` stays light (no pyarrow,
# pydantic, Spark or torch), and those layers, which import this package's __version__, find it initialised.


def load_data(path, dataset: str = "mnist"):
    """Keras-style ``((x_train, y_train), (x_test, y_test))``; see :func:`spark_mnist.shards.arrays.load_data`."""
    from spark_mnist.shards.arrays import load_data as _load_data

    return _load_data(path, dataset)


def open_dataset(path):
    """The dataset ingested at ``path``, opened through its manifest; see
    :func:`spark_mnist.shards.contract.open_dataset`."""
    from spark_mnist.shards.contract import open_dataset as _open_dataset

    return _open_dataset(path)


def _settings(config: str | os.PathLike | None, section: str, values: dict[str, Any]):
    """The settings of ``config`` (``None``: the defaults; on Databricks, :data:`spark_mnist.config.DATABRICKS_DEFAULTS`
    on top of them) with ``values`` on top of ``section``.

    Raises:
        InputError: a key that is not a setting of ``section`` (``Invalid train setting: 'epoch'. Must be one of
            ...``), a bad value or config file.
    """
    from spark_mnist.config import DATABRICKS_DEFAULTS, load_settings
    from spark_mnist.tracking import on_databricks

    defaults = DATABRICKS_DEFAULTS if config is None and on_databricks() else None
    return load_settings(config, {section: values}, defaults=defaults)


def ingest(spark, source: str, output: str, *, config: str | os.PathLike | None = None, **settings: Any) -> "Manifest":
    """Ingest the four gz IDX files (or a Keras ``mnist.npz``) at ``source`` into the Parquet dataset ``output``,
    on ``spark`` (the notebook's session, classic or Spark Connect / serverless); driver-side.

    Args:
        spark: the Spark session; ``None``: the active one, else one started from the config's ``spark`` settings.
        source, output: as ``spark-mnist ingest --source --output`` (paths, ``dbfs:/``, ``/Volumes/...``).
        config: a settings YAML whose ``ingest`` section the keywords override (default: the defaults; on
            Databricks, with :data:`spark_mnist.config.DATABRICKS_DEFAULTS` on top).
        **settings: any ``ingest`` setting (``dataset="mnist"``, ``num_shards=8``, ``strict=True``, ...).
    Returns:
        The manifest published (:class:`spark_mnist.shards.contract.Manifest`: dataset, generation, source files with
        sha256, rows, label histogram and shard files per split; ``.to_dict()`` is ``_manifest.json``).
    Raises:
        InputError: an unknown setting, bad input files (the message names the file and what is wrong).
    """
    from spark_mnist import pipeline

    return pipeline.ingest(spark, _settings(config, "ingest", {"source": source, "output": output, **settings}))


def train(
    data: str, *, launcher: str | None = None, spark=None, config: str | os.PathLike | None = None, **settings: Any
) -> dict[str, Any]:
    """Train on the dataset ingested at ``data`` with ``launcher``; returns rank 0's metrics.

    Args:
        data: the ingested dataset directory (``output`` of :func:`ingest`).
        launcher: ``"torch-distributor"`` (pyspark's TorchDistributor on ``spark``, or the notebook's active
            session; a classic GPU cluster), ``"torchrun"`` (local processes, no Spark) or ``"ai-runtime"``
            (``databricks.air``: the serverless GPUs attached, or submitted to with ``remote_gpu=True``);
            default: the config's (``torch-distributor``).
        spark: the session for ``torch-distributor``; ``None``: the active one, else one started from the config's
            ``spark`` settings (and stopped afterwards).
        config: a settings YAML whose ``train`` section the keywords override (default: the defaults; on
            Databricks, with :data:`spark_mnist.config.DATABRICKS_DEFAULTS` on top: the cluster's session, the
            workers' GPUs, the shards read directly).
        **settings: any ``train`` setting (``epochs=5``, ``num_processes=8``, ``use_gpu=True``,
            ``run_dir="/Volumes/..."``, ``accelerator_type="GPU_8xH100"``, ...), as on the command line.
    Returns:
        The metrics JSON of ``spark-mnist train`` (``test_accuracy``, ``history``, ``model_path``, ...).
    Raises:
        InputError: an unknown setting or bad value; a launcher whose package or GPUs are missing
            (``LauncherUnavailableError``).
        TrainingFailedError: a rank failed through ``max_restarts`` relaunches.
    """
    from spark_mnist import pipeline

    values = {"data": os.fspath(data), "launcher": launcher, **settings}  # launcher None: the config's
    return pipeline.train(spark, _settings(config, "train", values))
