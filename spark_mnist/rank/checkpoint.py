"""The training checkpoint: its format, and saving and loading it safely.  Runs on every rank (rank 0 saves).

On disk ``run_dir/checkpoint.pt`` (:data:`spark_mnist.runs.CHECKPOINT_NAME`) is ``torch.save`` of
a plain dict (:func:`save_checkpoint`) of tensors, numbers, strings, lists and tuples, so that it loads with
``torch.load(..., weights_only=True)``, which refuses anything that would run code while unpickling (a checkpoint
planted on a shared volume cannot run code through ``--resume``).  Its ``"model"`` entry is the model's
``state_dict``, so the evaluating tools accept a checkpoint as a model file.  Its ``"loader"`` entry is the training
loader's :meth:`~spark_mnist.rank.loader.ShardLoader.state_dict`: the position and everything that decides what comes
next (seed, epoch, samples, world size, global batch size, the split's rows, the dataset's identity), so the
checkpoint describes itself and a resume that cannot honour it is refused in one line.
Pattern: pytorch/examples ``mnist/main.py`` (save the ``state_dict``), torch's ``weights_only`` loading, Mosaic
Streaming's ``StreamingDataset.state_dict``.
"""

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from spark_mnist.errors import CheckpointError, LoaderStateError
from spark_mnist.fs import replacing
from spark_mnist.rank.order import STATE_KEYS
from spark_mnist.runs import CHECKPOINT_NAME

__all__ = ["Checkpoint", "to_cpu", "save_checkpoint", "load_checkpoint"]


@dataclass
class Checkpoint:
    """Where a training run stands.

    Attributes:
        model: the model's ``state_dict`` (name -> tensor; the module's, not the DDP wrapper's).
        optimizer: the optimizer's ``state_dict``.
        loader: the training loader's ``state_dict`` (:meth:`spark_mnist.rank.loader.ShardLoader.state_dict`): its
            ``epoch`` the epoch to resume in (from 0), its ``step`` the steps of it already run.
        source: the checkpoint as messages name it: the file it was loaded from (not saved), or
            ``"the checkpoint"`` for one built in memory.
    """

    model: dict[str, Any]
    optimizer: dict[str, Any]
    loader: dict[str, Any]
    source: str = field(default="the checkpoint", compare=False)

    def batch_size_for(self, world_size: int) -> int:
        """The per-rank batch size that holds this checkpoint's global batch over ``world_size`` ranks.

        Raises:
            LoaderStateError: ``world_size`` does not divide the global batch (the message names the file and the
                world sizes in 1..8 that do).
        """
        global_batch = int(self.loader["global_batch_size"])
        if world_size < 1 or global_batch % world_size:
            # The world sizes a resumed run is offered: 1..8.
            fits = ", ".join(str(m) for m in range(1, 9) if global_batch % m == 0)
            raise LoaderStateError(
                f"Cannot resume: the global batch size {global_batch} of {self.source} does not split over "
                f"{world_size} ranks; resume on one of {fits} ranks."
            )
        return global_batch // world_size


def to_cpu(state: Any) -> Any:
    """``state`` (a ``state_dict``: nested dicts, lists and tuples of tensors and plain values) with every tensor
    on the CPU, detached; CPU tensors are not copied.  What is saved, so that a plain ``torch.load`` of the file
    works where there is no GPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return type(state)((k, to_cpu(v)) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return state


def save_checkpoint(checkpoint: Checkpoint, run_dir: str) -> None:
    """Write ``checkpoint`` to ``run_dir/checkpoint.pt``, atomically, as the plain dict of its ``model``,
    ``optimizer`` and ``loader`` (tensors are not copied; ``source`` is not saved).  Rank 0 only."""
    state = {"model": checkpoint.model, "optimizer": checkpoint.optimizer, "loader": dict(checkpoint.loader)}
    with replacing(os.path.join(run_dir, CHECKPOINT_NAME)) as tmp:
        torch.save(state, tmp)


def load_checkpoint(run_dir: str) -> Checkpoint | None:
    """The checkpoint in ``run_dir``, or ``None`` when there is none.

    Loaded on the CPU with ``torch.load(..., weights_only=True)``: a file whose unpickling would call anything
    other than torch's tensor and container rebuilders is refused before anything in it runs.  Whether this run can
    honour it is for :meth:`Checkpoint.batch_size_for` and the training loader's
    :meth:`~spark_mnist.rank.loader.ShardLoader.load_state_dict` to say.

    Raises:
        CheckpointError: a file that weights-only loading refuses or cannot read, or one that lacks an entry of
            :func:`save_checkpoint`'s dict or of the loader state.  The message names the file.
    """
    path = os.path.join(run_dir, CHECKPOINT_NAME)
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused or unreadable as a weights-only checkpoint, nothing in it was run ({first})"
        ) from e

    def check(entries: Any, expected: list[str], what: str) -> None:
        if not isinstance(entries, dict) or not set(expected) <= set(entries):
            found = sorted(map(str, entries)) if isinstance(entries, dict) else type(entries).__name__
            raise CheckpointError(f"{path}: {what} {expected}, found {found}")

    check(state, ["model", "optimizer", "loader"], "not a training checkpoint: expected the entries")
    check(state["loader"], list(STATE_KEYS), "its loader state lacks entries: expected")
    return Checkpoint(model=state["model"], optimizer=state["optimizer"], loader=state["loader"], source=path)
