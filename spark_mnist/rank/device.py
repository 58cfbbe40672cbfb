"""Internal (not public API; docs/reference/api.md).  A rank's device, in every rank: its torch threads, which
device it trains on, how long it waits for the other ranks, and how long the device waits for its data
(:class:`DataWait`).  :mod:`spark_mnist.rank.train` uses them.
"""

import os
import time
from datetime import timedelta
from typing import Iterator

import torch

from spark_mnist.errors import EnvironmentMismatchError

__all__ = ["PROCESS_GROUP_TIMEOUT", "threads_per_rank", "rank_device", "DataWait", "resolve"]

# The longest a rank waits in one collective (or at the rendezvous of init_process_group) for the other ranks: a rank
# that died or hangs then fails the others with a timeout error instead of holding the job.  Far above any step,
# evaluation or checkpoint save of these models; torch's own default for nccl.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)


def threads_per_rank(setting: int, local_world_size: int) -> int:
    """Torch threads of one rank: ``setting`` (``train.threads_per_rank``) when set, else the cores this process may
    run on (its CPU affinity, else the machine's) divided among the ``local_world_size`` ranks on the node, at
    least 1."""
    # sched_getaffinity: not on macOS or Windows.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return setting or max(1, cores // local_world_size)


def rank_device(use_gpu: bool, local_rank: int) -> torch.device:
    """``cuda:local_rank`` (made the current device) with ``use_gpu``, else the CPU.  The launchers give each rank its
    GPUs through ``CUDA_VISIBLE_DEVICES`` (TorchDistributor: the GPUs it picked on the driver, or the Spark task's), so
    ``LOCAL_RANK`` indexes the devices the process sees.

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


class DataWait:
    """Fetches batches onto ``device`` and counts the seconds the device waited for them.

    The data wait is the time the device sat idle for want of the next batch, not the host's time in ``next()``:

    * on CUDA, an event is recorded when the batch is asked for (the device reaches it once the work queued before,
      the previous step, is done) and another once the batch's copy to the device (or its gather there) is queued;
      the time between them on the device is the host's fetch beyond what the device still had to do, plus the copy.
      While the host runs ahead of the device, only the copy counts.  The events are read once they have completed
      (:meth:`seconds` waits for the last ones), so no step waits for them;
    * on the CPU, the device is the host: the time spent in ``next()`` is the time the device waited.

    Attributes:
        waited: the seconds counted so far (the CUDA events not yet read excluded).
    """

    def __init__(self, device: torch.device):
        self.device, self.waited = device, 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def next(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(images, labels)`` of ``batches`` on the device (``non_blocking`` copies; no copy for tensors
        already there).

        Raises:
            StopIteration: ``batches`` is exhausted.
        """
        if self.device.type != "cuda":
            started = time.perf_counter()
            images, labels = next(batches)
            self.waited += time.perf_counter() - started
            return images, labels
        asked, ready = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        asked.record()
        images, labels = (t.to(self.device, non_blocking=True) for t in next(batches))
        ready.record()
        self._pending.append((asked, ready))
        self.seconds(done_only=True)
        return images, labels

    def seconds(self, done_only: bool = False) -> float:
        """All the seconds the device waited so far (on CUDA, after the last batch's copy has completed); with
        ``done_only``, only the CUDA events already completed are read (no wait)."""
        while self._pending and (not done_only or self._pending[0][1].query()):
            asked, ready = self._pending.pop(0)
            ready.synchronize()
            self.waited += asked.elapsed_time(ready) / 1000
        return self.waited


def resolve(setting: str, device: torch.device) -> bool:
    """An ``"auto"``/``"on"``/``"off"`` setting (train.resident_data, train.channels_last): ``"auto"`` is on with
    a GPU (``use_gpu``), off on the CPU."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")
