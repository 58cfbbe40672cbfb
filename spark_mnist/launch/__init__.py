"""Internal (not public API; docs/reference/api.md).  Starting the ranks: the three launchers, one failure channel,
restarts from the last checkpoint (:func:`run_with_restarts`); runs where the command or notebook runs (the
driver).  See docs/concepts/launchers.md.

A launcher knows how to start a function on N ranks and nothing about training; :mod:`spark_mnist.pipeline` tells
it which function (:func:`spark_mnist.rank.train.train_worker`) and hands it the :class:`~spark_mnist.job.TrainJob`.
Every launcher runs that function in ``num_processes`` processes with torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and returns rank 0's value:

* ``torch-distributor`` (:func:`.torch_distributor.run`, the one module here that imports Spark): pyspark's
  ``TorchDistributor`` on the active Spark session, the ranks on the driver (local mode) or in Spark tasks (a
  classic GPU cluster);
* ``torchrun`` (:func:`run_torchrun`): local processes through ``torch.distributed.launcher.elastic_launch``, no
  Spark;
* ``ai-runtime`` (:func:`run_ai_runtime`): ``databricks.air.distributed``, on the GPUs attached (local mode) or on
  serverless GPUs (``remote_gpu``).

Each ``run`` imports its heavy package (pyspark, torch's elastic launcher, ``databricks.air``) only inside it.
:func:`check` refuses, before anything starts, a launcher whose package or hardware is missing, in one line naming
it and the fix (:class:`LauncherUnavailableError`, exit code 2).  :func:`launch` is the one failure channel: whatever
the launcher raises becomes :class:`~spark_mnist.runs.TrainingFailedError`, built before anything else can fail and
then given the ranks' error reports (:func:`spark_mnist.runs.failure`).

Restarts: relaunching training from the last checkpoint when a rank dies or raises (``train.max_restarts``).

Every launcher is relaunched the same way, around one launch (:func:`run_with_restarts`): a failed attempt
(:class:`TrainingFailedError`) is logged with its cause and relaunched, at most
``max_restarts`` times, resuming from the run directory's checkpoint when this run wrote one (a checkpoint that was
there before a fresh run started is not this run's and is not resumed from).  A failure that is bad input (every
rank's report is an :class:`~spark_mnist.errors.InputError`, e.g. a checkpoint of another run) would fail the same
way again and is not relaunched.  torchelastic's ``max_restarts`` and Spark's task retries restart a worker group
from its start; this restarts it from where the last checkpoint stands.
"""

import contextlib
import importlib
import logging
import os
import uuid
from dataclasses import replace
from typing import Any, Callable

from spark_mnist.config import TrainSettings
from spark_mnist.envs import scoped_env
from spark_mnist.errors import InputError, LauncherUnavailableError, require_extra
from spark_mnist.launch import torch_distributor
from spark_mnist.runs import CHECKPOINT_NAME, TrainingFailedError, clear_error_reports, failure

__all__ = ["LauncherUnavailableError", "TrainingFailedError", "check", "launch", "world_size", "decorator_kwargs",
           "run_torchrun", "run_ai_runtime", "run_with_restarts"]  # fmt: skip

log = logging.getLogger(__name__)

AIR_FIX = "pip install 'spark-mnist[ai-runtime]' (databricks-sdk-air[distributed]), or use --launcher torchrun"
PYSPARK_FIX = "pip install 'spark-mnist[local]' (or run on a Databricks ML runtime), or train with --launcher torchrun"


def world_size(settings: TrainSettings) -> int:
    """Ranks the launcher starts: ``num_processes``, or ai-runtime's ``accelerator_count`` when set."""
    return (settings.launcher == "ai-runtime" and settings.accelerator_count) or settings.num_processes


def _require_module(name: str, launcher: str, fix: str) -> None:
    """``import name``, or :class:`LauncherUnavailableError` naming the launcher, the package and ``fix``."""
    try:
        importlib.import_module(name)
    except ImportError as e:
        message = f"launcher '{launcher}' needs {name}, which does not import here ({e}): {fix}"
        raise LauncherUnavailableError(message) from None


def check(settings: TrainSettings) -> None:
    """Refuse, before anything starts, the launcher ``settings.launcher`` where its package or hardware is missing.

    * ``torchrun``: torch must import; with ``use_gpu``, one GPU per rank.
    * ``torch-distributor``: pyspark's ``ml.torch`` must import; local mode with ``use_gpu`` needs one of this
      machine's GPUs per rank (``TorchDistributor`` would quietly start fewer ranks).
    * ``ai-runtime``: ``databricks.air`` must import (databricks-sdk-air); local mode needs a GPU here per rank (as
      ``databricks.air`` itself checks); ``remote_gpu`` needs ``accelerator_type``, and at most one node of it: the
      rendezvous, run directory and checkpoint are those of one node's ranks (``GPU_<per node>x<kind>``).

    Raises:
        LauncherUnavailableError: the launcher's package is missing (pyspark, databricks-sdk-air, torch) or its
            hardware is absent (``use_gpu`` or ``ai-runtime`` in local mode without the GPUs), or ``remote_gpu``
            with more accelerators than one node of the type has (``GPU_8xH100``: 8; multi-node runs are not
            supported yet); one line naming it and the fix.
        InputError: ``ai-runtime`` with ``remote_gpu`` and no ``accelerator_type``.
    """
    name, ranks, gpu_fix = settings.launcher, world_size(settings), None
    if name == "torchrun":
        require_extra("torch.distributed.launcher.api", "torch", "launcher 'torchrun'")
        if settings.use_gpu:
            gpu_fix = "one GPU per rank with use_gpu: lower --num-processes, or train on CPU with --no-use-gpu"
    elif name == "torch-distributor":
        _require_module("pyspark.ml.torch.distributor", name, PYSPARK_FIX)
        if settings.use_gpu and settings.local_mode:
            gpu_fix = "in local mode every rank takes one of the driver's GPUs: lower --num-processes, or run the ranks"
            gpu_fix += " on the executors with --no-local-mode"
    else:
        _require_module("databricks.air", name, AIR_FIX)
        if not settings.remote_gpu:
            gpu_fix = "attach serverless GPU compute to this notebook or job, submit from here with --remote-gpu"
            gpu_fix += " --accelerator-type TYPE, or use --launcher torchrun"
        elif settings.accelerator_type is None:
            raise InputError(
                "train.accelerator_type: required with remote_gpu (the serverless GPUs to submit to, "
                "e.g. --accelerator-type GPU_8xH100)"
            )
        elif ranks > (per_node := int(settings.accelerator_type.removeprefix("GPU_").split("x")[0])):
            raise LauncherUnavailableError(
                f"launcher '{name}': {ranks} accelerators of {settings.accelerator_type} span "
                f"{-(-ranks // per_node)} nodes of {per_node} GPU(s), and multi-node runs are not supported yet: "
                f"use at most {per_node} (--accelerator-count)"
            )
    if gpu_fix is not None:
        torch = require_extra("torch", "torch", f"launcher '{name}'")
        if (found := torch.cuda.device_count()) < ranks:
            message = f"launcher '{name}' needs {ranks} GPU(s) on this machine and torch sees {found}: {gpu_fix}"
            raise LauncherUnavailableError(message)


def run_torchrun(fn: Callable[[Any], dict[str, Any]], job: Any) -> dict[str, Any]:
    """The ``torchrun`` launcher: ``elastic_launch`` of ``job.settings.num_processes`` ranks on this machine running
    ``fn(job)``; rank 0's return value.  Raises elastic's ``ChildFailedError`` when a rank fails or dies.

    ``torch.distributed.launcher.api.elastic_launch`` is what the ``torchrun`` command runs (``torch.distributed.run``),
    here as a function: a standalone c10d rendezvous on ``localhost`` with a free port, ``spawn``-started ranks with
    torchrun's environment, and the return values of the ranks by global rank.  It needs no Spark and serves a
    laptop, a GPU machine and the command of a Databricks ``ai_runtime_task`` (which runs that command once per node:
    docs/how-to/serverless-gpu-job.md).  Relaunching is left to :func:`run_with_restarts` (elastic's own
    ``max_restarts`` is 0), so every launcher restarts the same way: from the last checkpoint.  Source: torch's
    ``distributed/run.py`` (``--standalone``) and ``launcher/api.py``.
    """
    # torch here: the pipeline imports this module, and a run without torch must reach check()'s message.
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # torchrun --standalone: one node, c10d on this host with a free port; start_method: LaunchConfig's default, spawn
    standalone: dict[str, Any] = dict(min_nodes=1, max_nodes=1, rdzv_backend="c10d", rdzv_endpoint="localhost:0")
    run_id = f"spark-mnist-{uuid.uuid4().hex[:8]}"
    config = LaunchConfig(nproc_per_node=job.settings.num_processes, run_id=run_id, max_restarts=0, **standalone)
    # What the elastic agent writes into this process's environment is put back after the launch.
    with scoped_env({}, restore=("TORCHELASTIC_SIGNALS_TO_HANDLE",)):
        return elastic_launch(config, fn)(job)[0]


def decorator_kwargs(t: TrainSettings) -> dict[str, Any]:
    """The keyword arguments of ``databricks.air.distributed`` for the train settings ``t``: ``num_accelerators``
    (``accelerator_count``, else ``num_processes``), ``accelerator_type`` (``None``: the attached GPUs') and
    ``remote`` (``remote_gpu``).  The local-mode timeout is left at the package's default (3 hours)."""
    return dict(num_accelerators=world_size(t), accelerator_type=t.accelerator_type, remote=t.remote_gpu)


def run_ai_runtime(fn: Callable[[Any], dict[str, Any]], job: Any) -> dict[str, Any]:
    """The ``ai-runtime`` launcher: ``databricks.air.distributed(**decorator_kwargs(job.settings))(fn)
    .distributed(job)``: rank 0's return value of ``fn(job)``; raises what ``databricks.air`` raises when a rank fails.

    Databricks AI Runtime's ``databricks.air.distributed`` (serverless GPU compute) runs ``fn(job)`` once per GPU, as
    torchrun-style processes: on the GPUs attached to this notebook or job (local mode), or submitted to serverless
    GPUs from a CPU notebook or job (``remote_gpu``).  It returns the ranks' values as a list, rank 0's first.  The
    package is ``databricks-sdk-air`` with its ``distributed`` extra (``pip install 'spark-mnist[ai-runtime]'``);
    Beta, API as of 0.1.1 (``databricks/air/launcher.py``).
    """
    from databricks.air import distributed  # the ai-runtime extra: this module imports without it

    outputs = distributed(**decorator_kwargs(job.settings))(fn).distributed(job)
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def launch(fn: Callable[[Any], dict[str, Any]], job: Any) -> dict[str, Any]:
    """Run ``fn(job)`` on the ranks with the launcher ``job.settings.launcher``: the one failure channel of every
    launcher.

    The run directory's old error reports are cleared first; when the launcher raises, the ranks' reports are read
    (a truncated or unreadable one skipped) and :class:`TrainingFailedError` is built from them and raised from the
    launcher's error, so a failed rank reads the same under every launcher.

    Args:
        fn: the per-rank function, picklable; its return value is a dict of metrics.
        job: a :class:`~spark_mnist.job.TrainJob` (its ``settings`` and ``run_dir`` are read here).
    Returns:
        Rank 0's return value.
    Raises:
        TrainingFailedError: a rank failed or was lost.
    """
    runs = {"torch-distributor": torch_distributor.run, "torchrun": run_torchrun, "ai-runtime": run_ai_runtime}
    clear_error_reports(job.run_dir)
    try:
        return runs[job.settings.launcher](fn, job)
    except Exception as e:
        raise failure(job.run_dir, e) from e


def _stat(path: str) -> tuple[int, int] | None:
    with contextlib.suppress(OSError):
        return (st := os.stat(path)).st_mtime_ns, st.st_size
    return None


def _names(cls: type) -> set[str]:
    """The names of ``cls`` and its subclasses, at any depth."""
    return {cls.__name__}.union(*map(_names, cls.__subclasses__()))


def run_with_restarts(fn: Callable[[Any], dict[str, Any]], job: Any, *, resume: bool) -> dict[str, Any]:
    """:func:`launch` of ``fn`` on ``job``, relaunched after a failure at most ``job.settings.max_restarts`` times
    (0: none).

    Args:
        fn, job: as :func:`launch`; each launch gets a copy of ``job`` (a dataclass) whose ``settings.resume`` says
            whether it resumes from the run directory's checkpoint (``job.run_dir/checkpoint.pt``).
        resume: whether the run resumes (``--resume`` or ``resume: auto``); a fresh run resumes after a failure
            only from a checkpoint it wrote itself.
    Returns:
        The metrics of the attempt that finished, with ``restarts`` (relaunches it took).
    Raises:
        TrainingFailedError: the last attempt's failure, or a bad-input failure at once.
    """
    checkpoint, max_restarts = os.path.join(job.run_dir, CHECKPOINT_NAME), job.settings.max_restarts
    before, restarts = _stat(checkpoint), 0
    while True:
        try:
            attempt = replace(job, settings=job.settings.copy(update={"resume": resume}))
            return {**launch(fn, attempt), "restarts": restarts}
        except TrainingFailedError as e:
            # Bad input: every rank reported an InputError (by type name), and a relaunch would fail the same way.
            input_errors = _names(InputError)
            bad_input = bool(e.exceptions) and all(r.split(":", 1)[0] in input_errors for r in e.exceptions)
            if restarts >= max_restarts or bad_input:
                if restarts:
                    log.warning("training failed after %d restart(s) of %d: %s", restarts, max_restarts, e.summary)
                raise
            restarts += 1
            resume = resume or _stat(checkpoint) != before
            where = f"from the last checkpoint, {checkpoint}" if resume else "from the start (no checkpoint yet)"
            log.warning("restart %d/%d %s after: %s", restarts, max_restarts, where, e.summary)
