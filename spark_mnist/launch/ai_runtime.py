"""The ``ai-runtime`` launcher: Databricks AI Runtime's ``databricks.air.distributed`` (serverless GPU compute).

``distributed(num_accelerators, accelerator_type, remote)(fn).distributed(job)`` runs ``fn(job)`` once per GPU, as
torchrun-style processes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``): on the
GPUs attached to this notebook or job (local mode), or submitted to serverless GPUs from a CPU notebook or job
(``remote_gpu``).  It returns the ranks' values as a list, rank 0's first.  The package is ``databricks-sdk-air``
with its ``distributed`` extra (``pip install 'spark-mnist[ai-runtime]'``); Beta, API as of 0.1.1
(``databricks/air/launcher.py``).  In local mode it needs a GPU here (``torch.cuda.device_count() > 0``), as
``databricks.air`` itself checks.
"""

from __future__ import annotations

from typing import Any, Callable

from spark_mnist.config import TrainSettings
from spark_mnist.errors import InputError
from spark_mnist.launch import LauncherUnavailableError, require_gpus, require_module, world_size

__all__ = ["NAME", "PACKAGE_FIX", "decorator_kwargs", "run", "check"]

NAME = "ai-runtime"
PACKAGE_FIX = "pip install 'spark-mnist[ai-runtime]' (databricks-sdk-air[distributed]), or use --launcher torchrun"


def decorator_kwargs(settings: TrainSettings) -> dict[str, Any]:
    """The keyword arguments of ``databricks.air.distributed`` for ``settings``: ``num_accelerators``
    (``accelerator_count``, else ``num_processes``), ``accelerator_type`` (``None``: the attached GPUs') and
    ``remote`` (``remote_gpu``).  The local-mode timeout is left at the package's default (3 hours)."""
    return {
        "num_accelerators": world_size(settings),
        "accelerator_type": settings.accelerator_type,
        "remote": settings.remote_gpu,
    }


def run(fn: Callable[[Any], dict[str, Any]], job: Any) -> dict[str, Any]:
    """``databricks.air.distributed(**decorator_kwargs(job.settings))(fn).distributed(job)``: rank 0's return value
    of ``fn(job)``; raises what ``databricks.air`` raises when a rank fails."""
    from databricks.air import distributed  # the ai-runtime extra: every launcher module imports without it

    outputs = distributed(**decorator_kwargs(job.settings))(fn).distributed(job)
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def check(settings: TrainSettings) -> None:
    """Refuse, before anything starts, a machine without the package or (local mode) without the GPUs.

    Raises:
        LauncherUnavailableError: ``databricks.air`` does not import (databricks-sdk-air missing), or local mode
            on a machine where torch sees fewer GPUs than ranks (none at all: a CPU machine).
        InputError: ``remote_gpu`` without ``accelerator_type`` (the serverless GPU type must be named).
        LauncherUnavailableError: ``remote_gpu`` with more accelerators than one node of the type has (``GPU_8xH100``:
            8); multi-node runs are not supported yet.
    """
    require_module("databricks.air", NAME, PACKAGE_FIX)
    ranks = world_size(settings)
    if not settings.remote_gpu:
        fix = "attach serverless GPU compute to this notebook or job, submit from here with --remote-gpu"
        require_gpus(NAME, ranks, f"{fix} --accelerator-type TYPE, or use --launcher torchrun")
    elif settings.accelerator_type is None:
        raise InputError(
            "train.accelerator_type: required with remote_gpu (the serverless GPUs to submit to, "
            "e.g. --accelerator-type GPU_8xH100)"
        )
    # The rendezvous, run directory and checkpoint are those of one node's ranks (GPU_<per node>x<kind>).
    elif ranks > (per_node := int(settings.accelerator_type.removeprefix("GPU_").split("x")[0])):
        raise LauncherUnavailableError(
            f"launcher '{NAME}': {ranks} accelerators of {settings.accelerator_type} span "
            f"{-(-ranks // per_node)} nodes of {per_node} GPU(s), and multi-node runs are not supported yet: "
            f"use at most {per_node} (--accelerator-count)"
        )
