"""A rank's process: its torch threads, its device and its place in the process group.

The launchers give each rank its GPUs through ``CUDA_VISIBLE_DEVICES`` (TorchDistributor: the GPUs it picked on the
driver, or the Spark task's), so ``LOCAL_RANK`` indexes the devices the process sees.  The group is joined from
torchrun's environment (Spark's ``ml/torch/distributor.py`` docs give it).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from spark_mnist.errors import EnvironmentMismatchError

__all__ = ["PROCESS_GROUP_TIMEOUT", "threads_per_rank", "rank_device", "init_process_group", "abort_process_group"]

# The longest a rank waits in one collective (or at the rendezvous of init_process_group) for the other ranks: a rank
# that died or hangs then fails the others with a timeout error instead of holding the job.  Far above any step,
# evaluation or checkpoint save of these models; torch's own default for nccl.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)


def threads_per_rank(setting: int, local_world_size: int) -> int:
    """Torch threads of one rank: ``setting`` (``train.threads_per_rank``) when set, else the cores this process may
    run on (its CPU affinity, else the machine's) divided among the ``local_world_size`` ranks on the node, at
    least 1."""
    if setting:
        return setting
    # sched_getaffinity: not on macOS or Windows.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_world_size)


def rank_device(use_gpu: bool, local_rank: int) -> torch.device:
    """``cuda:local_rank`` (made the current device) with ``use_gpu``, else the CPU.

    Raises:
        RuntimeError: ``use_gpu`` where torch sees no CUDA device.
        EnvironmentMismatchError: ``LOCAL_RANK`` at or above the CUDA devices this process sees (more ranks on the
            node than GPUs).
    """
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("use_gpu is set but torch sees no CUDA device on this worker")
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise EnvironmentMismatchError(
            f"LOCAL_RANK {local_rank} has no GPU of its own: torch sees {visible} CUDA device(s) on this worker"
            f"{f' (CUDA_VISIBLE_DEVICES={shown})' if shown is not None else ''}; one GPU per rank: start at most "
            f"{visible} rank(s) per node (num_processes)"
        )
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def init_process_group(device: torch.device) -> None:
    """Join the process group from torchrun's environment: ``nccl`` bound to ``device`` on a GPU, else ``gloo``;
    collectives time out after :data:`PROCESS_GROUP_TIMEOUT`.

    Raises:
        RuntimeError: the group fails to form (the rendezvous unreachable, a timeout).
    """
    bound: dict[str, Any] = {}
    # device_id binds the communicator to the rank's GPU at once (torch >= 2.3; the torch extra admits 2.1).
    if device.type == "cuda" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        bound["device_id"] = device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT, **bound)


def abort_process_group() -> None:
    """Tear the process group down after an error without waiting on collectives that will never complete (other
    ranks may be dead or stuck): ``destroy_process_group`` waits for them, aborting does not.  Without an abort
    (older torch) the group is left for the process's exit to release.  Never raises."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if dist.is_initialized() and abort is not None:
        with contextlib.suppress(Exception):  # the rank's own error is what matters; its process ends next
            abort()
