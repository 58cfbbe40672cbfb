"""The ``torch-distributor`` launcher: pyspark's ``TorchDistributor`` on a Spark session.

The ranks run on the driver (``local_mode``, torchrun as a child process) or in Spark tasks on the executors (a
classic GPU cluster: one rank per GPU worker, ``spark.task.resource.gpu.amount: 1``).  The only module outside
``driver/`` that imports Spark.  Source: Spark's ``ml/torch/distributor.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from spark_mnist.config import TrainSettings
from spark_mnist.launch import LauncherUnavailableError, require_module

NAME = "torch-distributor"


@dataclass
class TorchDistributorLauncher:
    """``TorchDistributor(num_processes, local_mode, use_gpu).run(fn, job)``; ``spark`` is the session it runs on
    (classic or Spark Connect)."""

    settings: TrainSettings
    spark: Any
    name: str = NAME

    def run(self, fn: Callable[[Any], dict[str, Any]], job: Any) -> dict[str, Any]:
        """Rank 0's return value of ``fn(job)``; raises what ``TorchDistributor.run`` raises when a rank fails."""
        from pyspark.ml.torch.distributor import TorchDistributor

        t = self.settings
        return TorchDistributor(num_processes=t.num_processes, local_mode=t.local_mode, use_gpu=t.use_gpu).run(fn, job)


def check(settings: TrainSettings) -> None:
    """Refuse a machine where pyspark's ``ml.torch`` does not import (before a session starts).

    Raises:
        LauncherUnavailableError: pyspark missing.
    """
    require_module("pyspark.ml.torch.distributor", NAME, "pip install 'spark-mnist[local]' (or run on a Databricks "
                                                         "ML runtime), or train with --launcher torchrun")


def make(settings: TrainSettings, *, spark: Any = None) -> TorchDistributorLauncher:
    """The launcher on ``spark`` (checked by :func:`check` first).

    Raises:
        LauncherUnavailableError: no session.
    """
    if spark is None:
        raise LauncherUnavailableError(f"launcher '{NAME}' runs on a Spark session and none was given: start one "
                                       f"(spark_mnist.train(..., spark=spark)), or use --launcher torchrun")
    return TorchDistributorLauncher(settings, spark)
