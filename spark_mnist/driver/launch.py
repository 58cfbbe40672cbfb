"""Driver-side wiring: the converter choice and ``TorchDistributor`` (the SparkSession: :mod:`.session`).

Nothing here runs in the ranks: :func:`train` picks the files the ranks read (petastorm's converter cache where
petastorm works, else the ingested shards directly: :mod:`spark_mnist.driver.converter`), hands them to
:func:`spark_mnist.rank.train.train_worker` and launches it with ``TorchDistributor``.
"""

from __future__ import annotations

import logging
from typing import Any

from spark_mnist.config import Settings
from spark_mnist.driver import session
from spark_mnist.driver.converter import choose_converter, make_converters
from spark_mnist.paths import require_local
from spark_mnist.shards.contract import open_dataset

log = logging.getLogger(__name__)


class TrainingFailedError(RuntimeError):
    """A training rank failed; the message names the rank, its exception and the tail of its traceback."""

    @classmethod
    def from_reports(cls, reports: list[dict[str, Any]], error: BaseException) -> "TrainingFailedError":
        if not reports:
            return cls(f"training failed and no rank left an error report (killed by a signal, out of memory?): "
                       f"{error}")
        first = reports[0]
        others = "".join(f"; rank {r['rank']}: {r['exception']}" for r in reports[1:])
        tail = "".join(first["traceback"]).rstrip()
        return cls(f"rank {first['rank']} failed: {first['exception']}{others}\n{tail}")


def train(spark, settings: Settings) -> dict[str, Any]:
    """Train on the dataset ingested at ``settings.data_dir`` with ``TorchDistributor``; driver-side.

    The ranks read petastorm's converter cache or the ingested shards directly, as ``settings.train.converter``
    and the environment decide (:func:`spark_mnist.driver.converter.choose_converter`); the choice and its reason are
    logged once.

    Returns:
        Rank 0's metrics (see :func:`spark_mnist.rank.train.train_worker`), plus ``dataset`` and ``converter``
        (``"petastorm"`` or ``"none"``).
    Raises:
        DatasetNotFoundError: no complete dataset at the data directory.
        InputError: ``train.model`` names no registered model (:data:`spark_mnist.models.MODELS`).
        EnvironmentMismatchError: petastorm asked for where it cannot run.
        TrainingFailedError: a rank failed; the message names the rank, its exception and its traceback's tail.
    """
    from pyspark.ml.torch.distributor import TorchDistributor

    from spark_mnist.errors import InputError, check_choice
    from spark_mnist.job import TrainJob, clear_error_reports, read_error_reports
    from spark_mnist.models import MODELS
    from spark_mnist.rank.train import train_worker

    t = settings.train
    check_choice("train.model", t.model, MODELS, InputError)  # before Spark jobs and ranks start
    choice = choose_converter(t, connect=session.is_connect(spark))
    dataset = open_dataset(settings.data_dir)
    manifest = dataset.manifest
    if choice.uses_petastorm:
        log.info("converter: petastorm (%s)", choice.reason)
        converters = make_converters(spark, dataset, t.petastorm_cache_url, t.petastorm_row_group_bytes)
        files = {split: list(converter.file_urls) for split, converter in converters.items()}
    else:
        log.info("converter: none, the ranks read the ingested shards (%s)", choice.reason)
        converters = {}
        files = {split: dataset.files(split) for split in ("train", "test")}
    try:
        job = TrainJob(settings=t, train_files=files["train"], test_files=files["test"], dataset=manifest.dataset,
                       num_classes=len(manifest.classes), image_shape=tuple(manifest.image_shape),
                       run_dir=require_local(settings.run_dir, "run_dir"),
                       train_converter=converters["train"] if t.loader == "petastorm" else None)
        log.info("training %s", job.summary())
        clear_error_reports(job.run_dir)
        distributor = TorchDistributor(num_processes=t.num_processes, local_mode=t.local_mode, use_gpu=t.use_gpu)
        try:
            metrics = distributor.run(train_worker, job)
        except Exception as e:
            raise TrainingFailedError.from_reports(read_error_reports(job.run_dir), e) from e
    finally:
        for split, converter in converters.items():
            try:
                converter.delete()
            except Exception as e:  # noqa: BLE001 - the run's outcome stands; a leftover cache is only disk
                log.warning("could not delete petastorm's cache of the %s split: %s", split, e)
    result = {"dataset": manifest.dataset, "converter": choice.name, **metrics}
    from spark_mnist.tools.tracking import log_training_run

    run_id = log_training_run(settings.to_dict(), manifest.to_dict(), result, result.get("model_path"),
                              run_dir=job.run_dir)
    if run_id is not None:
        result["mlflow_run_id"] = run_id
    return result
