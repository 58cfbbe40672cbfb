"""The data on the device: a rank's decoded split kept as tensors on its training device, batches cut there.

:class:`spark_mnist.rank.loader.ShardLoader` with ``device=`` uses these.  When the rows it reads every epoch (the
whole split for the training order, the rank's range for evaluation) fit ``device_memory_budget_bytes``, they are
decoded once (the first epoch), moved to ``device`` as one uint8 image tensor and two int64 tensors (index, labels),
and every batch is an index gather there (``torch.index_select``), in the order of :mod:`spark_mnist.rank.order`:
the same batches as the host path, already on the device, with no host-to-device copy per step.  When they do not
fit, the loader keeps its host path and copies each batch to the device (``non_blocking`` from pinned memory on
CUDA), and says so once.

The budget's default: on CUDA a quarter of the device's free memory (``torch.cuda.mem_get_info``) when the loader is
built; on the CPU (standing in for a device, in tests and benchmarks) the host budget, ``memory_budget_bytes``.
"""

from __future__ import annotations

import contextlib
from typing import Generator, Iterator, Sequence

import numpy as np
import torch

__all__ = ["CUDA_FREE_MEMORY_FRACTION", "default_device_budget", "to_device", "resident_batches", "copied_to"]

# The share of a CUDA device's free memory a loader may fill with its resident split by default: the model, its
# activations and the optimizer need the rest.
CUDA_FREE_MEMORY_FRACTION = 0.25


def default_device_budget(device: torch.device, host_budget: int) -> int:
    """Bytes of decoded rows a loader may keep on ``device``: :data:`CUDA_FREE_MEMORY_FRACTION` of a CUDA device's
    free memory now, else ``host_budget`` (the CPU, or another device type: its memory is the host's)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_MEMORY_FRACTION)
    return host_budget


def to_device(
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray], image_shape: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Decoded ``(index (n,) int64, images (n, H*W) uint8, labels (n,) int64)`` as tensors on ``device``: index,
    images (n, 1, H, W), labels.  On the CPU they share the arrays' memory (no copy)."""
    index, images, labels = arrays
    images_t = torch.from_numpy(images).view(len(images), 1, *image_shape)
    return tuple(t.to(device) for t in (torch.from_numpy(index), images_t, torch.from_numpy(labels)))


def resident_batches(
    resident: tuple[torch.Tensor, ...], positions: np.ndarray, batch_size: int
) -> Iterator[tuple[torch.Tensor, ...]]:
    """``(index, images, labels)`` batches of ``batch_size`` rows (the last one shorter) of the ``resident`` tensors
    at ``positions`` (int64, into their rows), each an index gather on their device: the positions of the whole
    epoch go to the device once, then one ``index_select`` per tensor per batch."""
    if not len(positions):
        return
    device = resident[0].device
    on_device = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)).to(device)
    for lo in range(0, len(positions), batch_size):
        chosen = on_device[lo : lo + batch_size]
        yield tuple(torch.index_select(t, 0, chosen) for t in resident)


def copied_to(
    batches: Generator[tuple[torch.Tensor, ...], None, None], device: torch.device
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Each batch of ``batches`` with its tensors on ``device`` (``non_blocking``: asynchronous from pinned host
    memory on CUDA; no copy when they already are there).  Closing this closes ``batches``."""
    with contextlib.closing(batches):
        for batch in batches:
            yield tuple(t.to(device, non_blocking=True) for t in batch)
