"""The session seam: the one module that starts a SparkSession and touches its ``sparkContext``; driver-side.

:func:`spark_session` gives the CLI, the jobs, the tests and the benchmarks their session: one it starts (local
mode, quiet, with this interpreter as the workers' Python) or the one already there (Databricks, a notebook).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
from importlib import resources
from typing import TYPE_CHECKING, Iterator

from spark_mnist.config import SparkSettings
from spark_mnist.envs import scoped_env

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

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
# The Python of the workers and of the driver, where the user has not chosen one: this interpreter.
PYTHON_ENV = ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")


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


def session_conf(settings: SparkSettings, *, verbose: bool = False) -> dict[str, str]:
    """The Spark conf of a session spark-mnist starts: :data:`LOCAL_SPARK_CONF`, then ``settings.conf`` on top,
    and unless ``verbose`` the packaged ``log4j2.properties`` added to the driver's Java options."""
    conf = {**LOCAL_SPARK_CONF, **settings.conf}
    if not verbose:
        log4j = resources.files("spark_mnist").joinpath("log4j2.properties")
        java_opts = f"-Dlog4j2.configurationFile={log4j}"
        conf["spark.driver.extraJavaOptions"] = " ".join(filter(None, [conf.get("spark.driver.extraJavaOptions"),
                                                                       java_opts]))
    return conf


@contextlib.contextmanager
def spark_session(settings: SparkSettings, *, verbose: bool = False) -> Iterator["SparkSession"]:
    """A SparkSession for the CLI and jobs.

    With ``master`` set (local mode), starts one with :func:`session_conf`, and stops it on exit.  Its workers run
    this interpreter: ``PYSPARK_PYTHON`` and ``PYSPARK_DRIVER_PYTHON``, where unset, name it for the session's
    life and are unset again after it.  With ``master: null`` (Databricks), or when a session is already active (a
    notebook, a test suite), uses that session and leaves it running.
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if settings.master is None or active is not None:
        yield active or SparkSession.builder.getOrCreate()
        return
    builder = SparkSession.builder.master(settings.master).appName(settings.app_name)
    for key, value in session_conf(settings, verbose=verbose).items():
        builder = builder.config(key, value)
    # Spark 4.0.0 creates its artifact root as ./artifacts in the working directory (SPARK-52396, later releases use
    # a temporary directory): a session spark-mnist started removes it again when it did not exist before.
    artifacts = os.path.abspath(SPARK_40_ARTIFACTS_DIR)
    leave_artifacts = os.path.exists(artifacts)
    with scoped_env({key: sys.executable for key in PYTHON_ENV if key not in os.environ}):
        with jvm_stderr_filtered():
            spark = builder.getOrCreate()
        try:
            spark.sparkContext.setLogLevel("INFO" if verbose else settings.log_level)
            yield spark
        finally:
            spark.stop()
            if not leave_artifacts:
                shutil.rmtree(artifacts, ignore_errors=True)
