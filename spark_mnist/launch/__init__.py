"""Internal (not public API; docs/reference/api.md).  Starting the ranks: one module per launcher, one failure
channel, restarts from the last checkpoint; runs where the command or notebook runs (the driver).
See docs/concepts/launchers.md.

A launcher knows how to start a function on N ranks and nothing about training; :mod:`spark_mnist.pipeline` tells
it which function (:func:`spark_mnist.rank.train.train_worker`) and hands it the :class:`~spark_mnist.job.TrainJob`.
Every launcher runs that function in ``num_processes`` processes with torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and returns rank 0's value:

* ``torch-distributor`` (:mod:`.torch_distributor`): pyspark's ``TorchDistributor`` on the active Spark session,
  the ranks on the driver (local mode) or in Spark tasks (a classic GPU cluster);
* ``torchrun`` (:mod:`.torchrun`): local processes through ``torch.distributed.launcher.elastic_launch``, no Spark;
* ``ai-runtime`` (:mod:`.ai_runtime`): ``databricks.air.distributed``, on the GPUs attached (local mode) or on
  serverless GPUs (``remote_gpu``).

Each launcher module is two plain functions: ``check(settings)`` and ``run(fn, job)``; each imports its heavy
package (pyspark, torch's elastic launcher, ``databricks.air``) only inside them.  :func:`check` refuses, before
anything starts, a launcher whose package or hardware is missing, in one line naming it and the fix
(:class:`LauncherUnavailableError`, exit code 2).  :func:`launch` is the one failure channel: whatever the launcher
raises becomes :class:`~spark_mnist.runs.TrainingFailedError`, built before anything else can fail and then given
the ranks' error reports (:func:`spark_mnist.runs.failure`).  :mod:`.restarts` relaunches from the last checkpoint.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable

from spark_mnist.config import TrainSettings
from spark_mnist.errors import LauncherUnavailableError, require_extra
from spark_mnist.runs import TrainingFailedError, clear_error_reports, failure

__all__ = ["LauncherUnavailableError", "TrainingFailedError", "check", "launch", "world_size"]


def _launcher(name: str) -> ModuleType:
    """The module of the launcher ``name`` (a ``train.launcher`` value, checked by the settings), named after it:
    ``torch-distributor`` -> :mod:`.torch_distributor`.  Imported when first asked for: the launcher modules import
    this module's helpers below."""
    return importlib.import_module(f"spark_mnist.launch.{name.replace('-', '_')}")


def check(settings: TrainSettings) -> None:
    """Refuse, before anything starts, the launcher ``settings.launcher`` where its package or hardware is missing.

    Raises:
        LauncherUnavailableError: the launcher's package is missing (pyspark, databricks-sdk-air, torch) or its
            hardware is absent (``use_gpu`` or ``ai-runtime`` in local mode without the GPUs); one line naming it
            and the fix.
        InputError: ``ai-runtime`` with ``remote_gpu`` and no ``accelerator_type``.
    """
    _launcher(settings.launcher).check(settings)


def world_size(settings: TrainSettings) -> int:
    """Ranks the launcher starts: ``num_processes``, or ai-runtime's ``accelerator_count`` when set."""
    return (settings.launcher == "ai-runtime" and settings.accelerator_count) or settings.num_processes


def require_module(name: str, launcher: str, fix: str) -> Any:
    """``import name``, or :class:`LauncherUnavailableError` naming the launcher, the package and ``fix``."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        message = f"launcher '{launcher}' needs {name}, which does not import here ({e}): {fix}"
        raise LauncherUnavailableError(message) from None


def require_gpus(launcher: str, wanted: int, fix: str) -> None:
    """At least ``wanted`` CUDA devices visible to torch, or :class:`LauncherUnavailableError`."""
    torch = require_extra("torch", "torch", f"launcher '{launcher}'")
    if (found := torch.cuda.device_count()) < wanted:
        message = f"launcher '{launcher}' needs {wanted} GPU(s) on this machine and torch sees {found}: {fix}"
        raise LauncherUnavailableError(message)


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
    clear_error_reports(job.run_dir)
    try:
        return _launcher(job.settings.launcher).run(fn, job)
    except Exception as e:
        raise failure(job.run_dir, e) from e
