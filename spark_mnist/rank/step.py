"""One rank's steps: fetching a batch (and the time the device waited for it), one optimiser step, one evaluation.

As pytorch/examples ``mnist/main.py`` keeps ``train`` and ``test`` apart from ``main``; the loop that runs them is
:mod:`spark_mnist.rank.train`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from spark_mnist.models import Normalization, normalize

__all__ = ["to_input", "DataWait", "TrainStep", "evaluate"]

log = logging.getLogger(__name__)


def to_input(images: torch.Tensor, norm: Normalization, channels_last: bool) -> torch.Tensor:
    """A uint8 (B, 1, H, W) batch on the device as the model takes it: float, normalised with ``norm``, in
    ``channels_last`` memory format when asked."""
    x = normalize(images, norm)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


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
        asked = torch.cuda.Event(enable_timing=True)
        asked.record()
        images, labels = (t.to(self.device, non_blocking=True) for t in next(batches))
        ready = torch.cuda.Event(enable_timing=True)
        ready.record()
        self._pending.append((asked, ready))
        self._read(done_only=True)
        return images, labels

    def seconds(self) -> float:
        """All the seconds the device waited so far (on CUDA, after the last batch's copy has completed)."""
        self._read(done_only=False)
        return self.waited

    def _read(self, done_only: bool) -> None:
        while self._pending and (not done_only or self._pending[0][1].query()):
            asked, ready = self._pending.pop(0)
            ready.synchronize()
            self.waited += asked.elapsed_time(ready) / 1000


class TrainStep:
    """One optimiser step of ``ddp`` with ``optimizer``: cross-entropy, under bfloat16 autocast with ``bf16``.

    With ``compile``, the step runs ``torch.compile(ddp)``; where compiling fails, at once or in the compiled
    model's first step (as where inductor finds no C compiler), it says why in one warning line and runs
    uncompiled from then on (that first step again).

    Attributes:
        compiled: the step runs compiled (``False`` after a fallback).
    """

    def __init__(self, ddp: torch.nn.Module, optimizer: torch.optim.Optimizer, *, compile: bool, bf16: bool, rank: int):
        self.ddp, self.optimizer, self.bf16, self.rank = ddp, optimizer, bf16, rank
        self.model: Any = ddp
        self.compiled = self._first = False
        if compile:
            try:
                self.model, self.compiled, self._first = torch.compile(ddp), True, True
            except Exception as e:  # noqa: BLE001 - compiling is an optimisation: say why and train uncompiled
                self._fall_back(e)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Step on the model input ``x`` (float (B, 1, H, W), on the device) and int64 (B,) labels ``y``; returns
        the batch's mean loss (detached, a 0-d tensor on the device)."""
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss = self._forward_backward(x, y)
        except Exception as e:
            if not self._first:
                raise
            self._fall_back(e)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._forward_backward(x, y)
        self._first = False
        self.optimizer.step()
        return loss.detach()

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        return loss

    def _fall_back(self, error: BaseException) -> None:
        self.model, self.compiled, self._first = self.ddp, False, False
        first = (str(error).strip().splitlines() or [""])[0]
        log.warning(
            "rank %d: torch.compile failed, training uncompiled: %s: %s", self.rank, type(error).__name__, first
        )


def evaluate(
    model: torch.nn.Module, loader: Iterable, device: torch.device, norm: Normalization, channels_last: bool = False
) -> tuple[float, int, int]:
    """Sum of cross-entropy (nats), correct predictions and samples over this rank's share of ``loader``'s split
    (uint8 (B, 1, H, W) images, int64 (B,) labels), summed over all ranks when a process group is up.
    ``model.eval()`` under ``torch.no_grad()``, the loss summed with ``reduction="sum"``, as pytorch/examples
    ``mnist/main.py``'s ``test``.  Batches already on ``device`` (a resident loader) are not copied."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for images, labels in loader:
            y = labels.to(device, non_blocking=True)
            logits = model(to_input(images.to(device, non_blocking=True), norm, channels_last))
            totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
            totals[1] += (logits.argmax(1) == y).sum()
            totals[2] += len(y)
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, correct, count = totals.tolist()
    return loss, int(correct), int(count)
