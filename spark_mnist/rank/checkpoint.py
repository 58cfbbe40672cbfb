"""The training checkpoint: its format, and saving and loading it safely.  Runs on every rank (rank 0 saves).

On disk ``run_dir/checkpoint.pt`` is ``torch.save`` of :meth:`Checkpoint.to_dict`: a plain dict of tensors, numbers,
strings, lists and tuples, so that it loads with ``torch.load(..., weights_only=True)``, which refuses anything that
would run code while unpickling (a checkpoint planted on a shared volume cannot run code through ``--resume``).
Its ``"model"`` entry is the model's ``state_dict``, so the evaluating tools accept a checkpoint as a model file.
Pattern: pytorch/examples ``mnist/main.py`` (save the ``state_dict``), torch's ``weights_only`` loading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import torch

from spark_mnist.errors import InputError
from spark_mnist.fs import replacing

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(InputError):
    """A checkpoint that cannot be resumed from: unreadable, refused by weights-only loading (it would run code),
    missing entries, or written by a run of another world size or batch size."""


@dataclass
class Checkpoint:
    """Where a training run stands.

    Attributes:
        model: the model's ``state_dict`` (name -> tensor; the module's, not the DDP wrapper's).
        optimizer: the optimizer's ``state_dict``.
        epoch: the epoch to resume in, counted from 0.
        step: steps of ``epoch`` already run (0: the epoch starts afresh), as
            :meth:`spark_mnist.rank.loader.ShardLoader.state_dict` counts them.
        world_size: the ranks that wrote it; resuming mid-epoch needs the same.
        batch_size: samples per step per rank; resuming mid-epoch needs the same.
        seed: the run's seed (orders every epoch).
    """

    model: dict[str, Any]
    optimizer: dict[str, Any]
    epoch: int
    step: int
    world_size: int
    batch_size: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """The plain dict that is saved (the fields by name; tensors are not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def loader_state(self) -> dict[str, int]:
        """The position as :meth:`spark_mnist.rank.loader.ShardLoader.load_state_dict` takes it."""
        return {"epoch": self.epoch, "step": self.step}


def save_atomically(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`spark_mnist.fs.replacing`, so ``path`` is always complete."""
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(checkpoint: Checkpoint, run_dir: str) -> None:
    """Write ``checkpoint`` to ``run_dir/checkpoint.pt``, atomically.  Rank 0 only."""
    save_atomically(checkpoint.to_dict(), os.path.join(run_dir, CHECKPOINT_NAME))


def load_checkpoint(run_dir: str, *, world_size: int, batch_size: int) -> Checkpoint | None:
    """The checkpoint in ``run_dir``, or ``None`` when there is none.

    Loaded on the CPU with ``torch.load(..., weights_only=True)``: a file whose unpickling would call anything
    other than torch's tensor and container rebuilders is refused before anything in it runs.

    Raises:
        CheckpointError: a file that weights-only loading refuses or cannot read, one that lacks a field of
            :class:`Checkpoint`, or one written with another ``world_size`` or ``batch_size`` (resuming mid-epoch
            depends on both).  The message names the file.
    """
    path = os.path.join(run_dir, CHECKPOINT_NAME)
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused or unreadable as a weights-only checkpoint, nothing in it was run "
                              f"({first})") from e
    names = [f.name for f in fields(Checkpoint)]
    if not isinstance(state, dict) or not set(names) <= set(state):
        found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a training checkpoint: expected the entries {names}, found {found}")
    checkpoint = Checkpoint(**{name: state[name] for name in names})
    if (checkpoint.world_size, checkpoint.batch_size) != (world_size, batch_size):
        raise CheckpointError(f"{path}: written with world size {checkpoint.world_size} and batch size "
                              f"{checkpoint.batch_size}; this run has {world_size} and {batch_size}")
    return checkpoint
