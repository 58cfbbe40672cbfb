"""The ``torchrun`` launcher: ``num_processes`` local processes through torch's elastic launcher, no Spark.

``torch.distributed.launcher.api.elastic_launch`` is what the ``torchrun`` command runs
(``torch.distributed.run``), here as a function: a standalone c10d rendezvous on ``localhost`` with a free port,
``spawn``-started ranks with torchrun's environment, and the return values of the ranks by global rank.  It needs no
Spark (pyspark need not be installed) and serves a laptop, a GPU machine and the command of a Databricks
``ai_runtime_task`` (which runs that command once per node: docs/how-to/serverless-gpu-job.md).  Relaunching is left to
:mod:`spark_mnist.launch.restarts` (elastic's own ``max_restarts`` is 0), so every launcher restarts the same way:
from the last checkpoint.  Source: torch's ``distributed/run.py`` (``--standalone``) and ``launcher/api.py``.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable

from spark_mnist.config import TrainSettings
from spark_mnist.envs import scoped_env
from spark_mnist.errors import require_extra
from spark_mnist.launch import require_gpus

__all__ = ["run", "check"]


def run(fn: Callable[[Any], dict[str, Any]], job: Any) -> dict[str, Any]:
    """``elastic_launch`` of ``job.settings.num_processes`` ranks on this machine running ``fn(job)``; rank 0's
    return value.  Raises elastic's ``ChildFailedError`` when a rank fails or dies."""
    # torch here: the pipeline imports every launcher module, and a run without torch must reach check()'s message.
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=job.settings.num_processes,
        run_id=f"spark-mnist-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # torchrun --standalone: c10d on this host, a free port
        max_restarts=0,
    )  # start_method: LaunchConfig's default, spawn
    # What the elastic agent writes into this process's environment is put back after the launch.
    with scoped_env({}, restore=("TORCHELASTIC_SIGNALS_TO_HANDLE",)):
        return elastic_launch(config, fn)(job)[0]


def check(settings: TrainSettings) -> None:
    """Refuse a machine where torch does not import, or with ``use_gpu`` has fewer GPUs than ranks.

    Raises:
        LauncherUnavailableError: torch missing, or fewer GPUs than ranks with ``use_gpu``.
    """
    require_extra("torch.distributed.launcher.api", "torch", "launcher 'torchrun'")
    if settings.use_gpu:
        fix = "one GPU per rank with use_gpu: lower --num-processes, or train on CPU with --no-use-gpu"
        require_gpus("torchrun", settings.num_processes, fix)
