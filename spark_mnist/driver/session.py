"""The session seam: the one module that starts a SparkSession and touches ``sparkContext`` (or any JVM handle:
``_jvm``, ``_jsc``, ``_jdf``); driver-side.  Connecting from elsewhere: docs/how-to/databricks-connect.md; the local
sessions' work-arounds: docs/development.md.

:func:`spark_session` gives the CLI, the jobs, the tests and the benchmarks their session, classic or Spark Connect
(:func:`is_connect`), resolved in this order:

1. ``spark.remote`` (``--remote sc://host:port``): a Spark Connect session; ``local[N]`` starts a local Connect
   server in this process, with the conf of a local session (:func:`session_conf`);
2. the session already active (a Databricks notebook or job, serverless compute, a test suite);
3. the ``SPARK_REMOTE`` environment variable (Spark's own): a Spark Connect session;
4. ``databricks-connect`` installed: ``databricks.connect.DatabricksSession`` (configured the Databricks way: a
   ``~/.databrickscfg`` profile, ``DATABRICKS_HOST`` with ``DATABRICKS_CLUSTER_ID`` or
   ``DATABRICKS_SERVERLESS_COMPUTE_ID=auto``); its client-only pyspark cannot start a local session anyway;
5. ``spark.master: null``: the cluster's session (``SparkSession.builder.getOrCreate()``);
6. otherwise a classic session on ``spark.master`` (local mode, quiet, this interpreter as the workers' Python).

Everything else in the package works with both kinds through the few capabilities that differ, all here:
:func:`default_parallelism`, :func:`master_here` and :func:`broadcast_job` (classic only: a broadcast variable and
an RDD job).
"""

import contextlib
import json
import os
import re
import shutil
import sys
import threading
from functools import partial
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Optional

from spark_mnist.config import SparkSettings
from spark_mnist.envs import scoped_env
from spark_mnist.errors import EnvironmentMismatchError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["LOCAL_SPARK_CONF", "PYTHON_ENV", "CONNECT_ENV", "REMOTE_ENV", "jvm_stderr_filtered", "session_conf",
           "with_executor_env", "local_server_url", "is_connect", "default_parallelism", "master_here", "remote_url",
           "broadcast_job", "connect_expected", "spark_artifacts_removed", "spark_session"]  # fmt: skip

LOCAL_SPARK_CONF = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.driver.memory": "4g",
    "spark.sql.shuffle.partitions": "4",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    # Measured ~0.15 s less per Python task on Python 3.10/3.11 (CPython gh-103200; docs/development.md).
    "spark.python.daemon.module": "spark_mnist.tasks.spark_daemon",
    # Measured about -0.2 s of a warm ingest on local masters, where nothing leaves the machine (docs/benchmarks.md).
    "spark.broadcast.compress": "false",
    "spark.task.maxDirectResultSize": "64m",
}
# The Python of the workers and of the driver, where the user has not chosen one: this interpreter.
PYTHON_ENV = ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")
REMOTE_ENV = "SPARK_REMOTE"
# What pyspark sets in os.environ (and only partly unsets on stop) when it starts a local Spark Connect server...
_SERVER_ENV = (REMOTE_ENV, "SPARK_LOCAL_REMOTE", "SPARK_CONNECT_MODE_ENABLED", "SPARK_CONNECT_AUTHENTICATE_TOKEN")
# ... or a SparkContext.
CONNECT_ENV = (*_SERVER_ENV, "SPARK_AUTH_SOCKET_TIMEOUT", "SPARK_BUFFER_SIZE")


def _forward_stderr(read_fd: int, out_fd: int) -> None:
    """Copy lines from ``read_fd`` to ``out_fd`` until end of file, minus the JVM's start-up notices."""
    with open(read_fd, "rb") as pipe, open(out_fd, "wb", buffering=0) as out:
        # Spark 4's JVM announces --add-modules=jdk.incubator.vector on stderr; bad input's error stays one line
        # (test_cli).
        out.writelines(line for line in pipe if not line.startswith(b"WARNING: Using incubator modules:"))


@contextlib.contextmanager
def jvm_stderr_filtered() -> Iterator[None]:
    """While the block starts the driver JVM, point file descriptor 2 at a pipe that drops the JVM's start-up
    notices (``WARNING: Using incubator modules:``) and forwards everything else to the real stderr.  The JVM keeps
    the pipe as its stderr for its whole life, so a daemon thread forwards until the JVM exits; this process's own
    stderr is restored when the block ends."""
    sys.stderr.flush()
    real, (read_fd, write_fd) = os.dup(2), os.pipe()
    threading.Thread(target=_forward_stderr, args=(read_fd, os.dup(real)), daemon=True).start()
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
        java_opts = f"{conf.get('spark.driver.extraJavaOptions', '')} -Dlog4j2.configurationFile={log4j}"
        conf["spark.driver.extraJavaOptions"] = java_opts.strip()
    return conf


def with_executor_env(settings: SparkSettings, variables: Mapping[str, str]) -> SparkSettings:
    """``settings`` whose sessions also give ``variables`` to their executors and Python workers
    (``spark.executorEnv.NAME``; what ``spark.conf`` sets itself wins)."""
    conf = {f"spark.executorEnv.{name}": value for name, value in variables.items()}
    return settings.copy(update={"conf": {**conf, **settings.conf}}) if conf else settings


def local_server_url() -> str:
    """``sc://localhost:PORT`` of the Spark Connect server a local remote (``remote: local[N]``) started in this
    process, by pyspark's own lookup: 15002, or with ``SPARK_TESTING`` set the ephemeral port pyspark then binds."""
    # pyspark here: the CLI and the test kit import this module without Spark.
    from pyspark.sql.connect.client import DefaultChannelBuilder

    return f"sc://localhost:{DefaultChannelBuilder.default_port()}"


def is_connect(spark: Any) -> bool:
    """Whether ``spark`` is a Spark Connect session (``--remote``, Databricks Connect, serverless compute, standard
    access mode), which has no ``sparkContext`` and no JVM on this side."""
    # pyspark's Spark Connect client, which Databricks Connect ships too
    return type(spark).__module__.startswith("pyspark.sql.connect.")


def default_parallelism(spark: "SparkSession") -> int:
    """The cluster's default parallelism (cores across its executors), at least 1.

    Classic: ``sparkContext.defaultParallelism``.  Spark Connect: the cores of a local master on this machine
    (:func:`master_here`), as Spark counts them (``local`` 1, ``local[N]`` and ``local[N,F]`` N, ``local[*]`` this
    machine's), else the partitions of ``spark.range`` without a partition count, which Spark sizes by
    ``spark.default.parallelism`` or the cores across the executors (one small job).
    """
    if not is_connect(spark):
        return max(1, spark.sparkContext.defaultParallelism)
    local = re.fullmatch(r"local(?:\[(\*|\d+)(?:,\s*\d+)?\])?", master_here(spark) or "")
    if local is None:
        return max(1, int(spark.range(0, 1 << 20).selectExpr("max(spark_partition_id())").collect()[0][0]) + 1)
    return (os.cpu_count() or 1) if local.group(1) == "*" else max(1, int(local.group(1) or 1))


def master_here(spark: "SparkSession") -> Optional[str]:
    """The master URL of the cluster that runs the tasks (``local[2]``, ``spark://...``) where this process runs on
    its driver's machine: always for a classic session, and for a Spark Connect session whose server listens on a
    loopback address (a local Connect server).  ``None`` elsewhere (Databricks Connect, serverless), or where the
    server does not say: executors there never see this machine's disk."""
    if not is_connect(spark):
        return spark.sparkContext.master
    if str(getattr(getattr(spark, "client", None), "host", "")).lower() in ("localhost", "127.0.0.1", "::1", "[::1]"):
        with contextlib.suppress(Exception):  # a server may refuse to show its static conf
            return spark.conf.get("spark.master", None)
    return None


def broadcast_job(
    spark: "SparkSession", value: Any, tasks: int, task: Callable[[Any, Iterator[int]], Iterable]
) -> list:
    """On a classic session (only: Spark Connect has neither broadcast variables nor RDDs): ``value`` shipped once
    to every executor as a broadcast variable, then one job of ``tasks`` tasks, task ``t`` running
    ``task(handle, iter([t]))`` (``handle.value`` is ``value``); what the tasks return, collected.  The broadcast
    variable is destroyed after the job."""
    shipped = spark.sparkContext.broadcast(value)
    try:
        return spark.sparkContext.parallelize(range(tasks), tasks).mapPartitions(partial(task, shipped)).collect()
    finally:
        shipped.destroy()


def remote_url(settings: SparkSettings) -> Optional[str]:
    """The Spark Connect URL a session would use: ``settings.remote``, else ``SPARK_REMOTE``, else ``None``."""
    return settings.remote or os.environ.get(REMOTE_ENV) or None


def _databricks_session_class() -> Any:
    """``databricks.connect.DatabricksSession`` where ``databricks-connect`` is installed, else ``None``."""
    with contextlib.suppress(ImportError):
        from databricks.connect import DatabricksSession  # optional: databricks-connect, off the cluster

        return DatabricksSession
    return None


def connect_expected(settings: SparkSettings) -> bool:
    """Whether :func:`spark_session` will give a Spark Connect session, as far as can be told before starting one
    (an already active session, e.g. serverless compute's, is only known once there): a remote URL is set, or
    Databricks Connect is installed."""
    return remote_url(settings) is not None or _databricks_session_class() is not None


@contextlib.contextmanager
def spark_artifacts_removed() -> Iterator[None]:
    """Remove, after the block, the ``spark-*`` folders that appeared in ``./artifacts`` during it, and
    ``./artifacts`` itself where the block created it and left it empty; a user's files there stay."""
    # Spark 4.0.0 leaves its artifact root in ./artifacts of the working directory (SPARK-52396; docs/development.md).
    artifacts = Path("artifacts").absolute()
    existed, before = artifacts.is_dir(), set(artifacts.glob("spark-*"))
    try:
        yield
    finally:
        for path in set(artifacts.glob("spark-*")) - before:
            shutil.rmtree(path, ignore_errors=True)
        if not existed:
            with contextlib.suppress(OSError):  # not empty: the user's files stay, and the folder with them
                artifacts.rmdir()


@contextlib.contextmanager
def spark_session(settings: SparkSettings, *, verbose: bool = False) -> Iterator["SparkSession"]:
    """A SparkSession for the CLI and jobs, classic or Spark Connect, in the order of the module docstring.

    A session this function starts (a local master, a local Connect server, a client of a remote Connect server or
    of Databricks Connect) is stopped on exit, and the environment variables pyspark set for it are restored; one
    that was already active is left running.  Local sessions run this interpreter in their workers:
    ``PYSPARK_PYTHON`` and ``PYSPARK_DRIVER_PYTHON``, where unset, name it for the session's life only.

    Raises:
        EnvironmentMismatchError: Databricks Connect is installed but could not create a session (not configured:
            no profile, host or cluster); the message says how to configure it or to pass ``--remote``.
    """
    from pyspark.sql import SparkSession  # pyspark here: the CLI and the test kit import this module without Spark

    active = None if settings.remote else SparkSession.getActiveSession()
    url = remote_url(settings)
    databricks_session: Any = _databricks_session_class() if active is None and url is None else None
    if active is None and url is None and databricks_session is None and settings.master is None:
        active = SparkSession.builder.getOrCreate()  # the cluster's session
    if active is not None:  # not this function's to stop
        yield active
        return
    with scoped_env({}, restore=CONNECT_ENV), contextlib.ExitStack() as stack:
        if databricks_session is not None:
            try:
                spark = databricks_session.builder.getOrCreate()
            except Exception as e:
                raise EnvironmentMismatchError(
                    f"databricks-connect is installed but gave no session ({type(e).__name__}: {e}); configure it "
                    f"(a ~/.databrickscfg profile or DATABRICKS_HOST with DATABRICKS_CLUSTER_ID, or "
                    f"DATABRICKS_SERVERLESS_COMPUTE_ID=auto), or pass --remote sc://host:port"
                ) from e
        elif url is not None and not url.startswith("local"):
            spark = SparkSession.builder.remote(url).getOrCreate()
        else:  # on this machine: a classic local master, or (remote local[N]) a Connect server pyspark starts here
            conf = session_conf(settings, verbose=verbose)
            stack.enter_context(spark_artifacts_removed())
            stack.enter_context(scoped_env({key: sys.executable for key in PYTHON_ENV if key not in os.environ}))
            builder: Any = SparkSession.builder  # Any: pyspark's types refuse an Optional master, set here
            builder = builder.remote(url) if url else builder.master(settings.master).appName(settings.app_name)
            # The conf of a local Connect server's own session: pyspark reads it from these variables when it starts
            # the server (pyspark.sql.connect.session; given to the builder, it would also be set, and refused, on the
            # Connect session itself).
            env = {"PYSPARK_REMOTE_INIT_CONF_LEN": "1", "PYSPARK_REMOTE_INIT_CONF_0": json.dumps(conf)} if url else {}
            with jvm_stderr_filtered(), scoped_env(env):
                spark = (builder if url else builder.config(map=conf)).getOrCreate()
            if url is None:
                spark.sparkContext.setLogLevel("INFO" if verbose else settings.log_level)
        stack.callback(spark.stop)
        yield spark
