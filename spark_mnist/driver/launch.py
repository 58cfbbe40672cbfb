"""Driver-side wiring: the SparkSession, the converter choice and ``TorchDistributor``.

Nothing here runs in the ranks: :func:`train` picks the files the ranks read (petastorm's converter cache where
petastorm works, else the ingested shards directly: :mod:`spark_mnist.driver.converter`), hands them to
:func:`spark_mnist.rank.train.train_worker` and launches it with ``TorchDistributor``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
from importlib import resources
from typing import TYPE_CHECKING, Any, Iterator

from spark_mnist.shards import contract
from spark_mnist.config import Settings, SparkSettings
from spark_mnist.driver.converter import choose_converter, make_converters
from spark_mnist.paths import normalize_uri, require_local

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

LOCAL_SPARK_CONF = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.driver.memory": "4g",
    "spark.sql.shuffle.partitions": "4",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    # Spark's daemon minus the archives whose re-reading cost ~0.15 s per Python task (see spark_daemon).
    "spark.python.daemon.module": "spark_mnist.driver.spark_daemon",
    # Local masters keep broadcasts and task results on this machine: compressing broadcasts, and routing task
    # results over 1 MiB (the source files' bytes in ingest) through the block manager, cost time and save nothing.
    "spark.broadcast.compress": "false",
    "spark.task.maxDirectResultSize": "64m",
}
# What the driver JVM prints on its stderr at start-up that says nothing to a user: Spark 4 starts Java with
# --add-modules=jdk.incubator.vector, and Java announces that on stderr whatever the log configuration.
JVM_START_NOTICES = (b"WARNING: Using incubator modules:",)
SPARK_40_ARTIFACTS_DIR = "artifacts"


def _forward_stderr(read_fd: int, out_fd: int) -> None:
    """Copy lines from ``read_fd`` to ``out_fd`` until end of file, minus :data:`JVM_START_NOTICES`."""
    with open(read_fd, "rb", buffering=0) as pipe, open(out_fd, "wb", buffering=0) as out:
        pending = b""
        while chunk := pipe.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = [line for line in lines if not line.startswith(JVM_START_NOTICES)]
            if kept:
                out.write(b"".join(line + b"\n" for line in kept))
        if pending and not pending.startswith(JVM_START_NOTICES):
            out.write(pending)


@contextlib.contextmanager
def jvm_stderr_filtered() -> Iterator[None]:
    """While the block starts the driver JVM, point file descriptor 2 at a pipe that drops the JVM's start-up
    notices (:data:`JVM_START_NOTICES`) and forwards everything else to the real stderr.

    The JVM keeps the pipe as its stderr for its whole life, so a daemon thread forwards until the JVM exits; this
    process's own stderr is restored when the block ends.  This keeps the one-line error of bad input one line on
    Spark 4.
    """
    sys.stderr.flush()
    real = os.dup(2)
    read_fd, write_fd = os.pipe()
    threading.Thread(target=_forward_stderr, args=(read_fd, os.dup(real)), name="spark-mnist-jvm-stderr",
                     daemon=True).start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)
        os.close(real)


@contextlib.contextmanager
def spark_session(settings: SparkSettings, *, verbose: bool = False) -> Iterator["SparkSession"]:
    """A SparkSession for the CLI and jobs.

    With ``master`` set (local mode), starts one with quiet logging and this interpreter as the Python of the
    workers, and stops it on exit.  With ``master: null`` (Databricks), or when a session is already active (a
    notebook, a test suite), uses that session and leaves it running.
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if settings.master is None or active is not None:
        yield active or SparkSession.builder.getOrCreate()
        return
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.master(settings.master).appName(settings.app_name)
    conf = {**LOCAL_SPARK_CONF, **settings.conf}
    if not verbose:
        log4j = resources.files("spark_mnist").joinpath("log4j2.properties")
        java_opts = f"-Dlog4j2.configurationFile={log4j}"
        conf["spark.driver.extraJavaOptions"] = " ".join(filter(None, [conf.get("spark.driver.extraJavaOptions"),
                                                                       java_opts]))
    for key, value in conf.items():
        builder = builder.config(key, value)
    # Spark 4.0.0 creates its artifact root as ./artifacts in the working directory (SPARK-52396, later releases use
    # a temporary directory): a session spark-mnist started removes it again when it did not exist before.
    artifacts = os.path.abspath(SPARK_40_ARTIFACTS_DIR)
    leave_artifacts = os.path.exists(artifacts)
    with jvm_stderr_filtered():
        spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("INFO" if verbose else settings.log_level)
    try:
        yield spark
    finally:
        spark.stop()
        if not leave_artifacts:
            shutil.rmtree(artifacts, ignore_errors=True)


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


def _dataset_manifest(data: str) -> tuple[str, dict[str, Any]]:
    return normalize_uri(data).uri, contract.load_manifest(require_local(data, "the dataset"))


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
    choice = choose_converter(t)
    data_uri, manifest = _dataset_manifest(settings.data_dir)
    if choice.uses_petastorm:
        log.info("converter: petastorm (%s)", choice.reason)
        converters = make_converters(spark, data_uri, t.petastorm_cache_url, t.petastorm_row_group_bytes)
        files = {split: list(converter.file_urls) for split, converter in converters.items()}
    else:
        log.info("converter: none, the ranks read the ingested shards (%s)", choice.reason)
        converters = {}
        dataset_dir = require_local(settings.data_dir, "the dataset")
        files = {split: contract.split_files(dataset_dir, manifest, split) for split in ("train", "test")}
    try:
        job = TrainJob(settings=t, train_files=files["train"], test_files=files["test"], dataset=manifest["dataset"],
                       num_classes=len(manifest["classes"]), image_shape=tuple(manifest["image_shape"]),
                       run_dir=require_local(t.run_dir, "run_dir"),
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
    result = {"dataset": manifest["dataset"], "converter": choice.name, **metrics}
    from spark_mnist.tools.tracking import log_training_run

    run_id = log_training_run(settings.to_dict(), manifest, result, result.get("model_path"), run_dir=job.run_dir)
    if run_id is not None:
        result["mlflow_run_id"] = run_id
    return result
