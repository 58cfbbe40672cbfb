"""Per-rank facts, read once from the environment into one :class:`World` that the rank's code is handed.

``torchrun`` (which ``TorchDistributor`` starts) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``LOCAL_WORLD_SIZE`` in every rank; a plain ``python`` process has none of them and is rank 0 of 1.  Nothing else in
the package reads these variables.  Pattern: mosaicml-streaming ``streaming/base/world.py``.
"""

import os
from dataclasses import dataclass
from typing import Mapping

from spark_mnist.errors import invalid

__all__ = ["World"]


@dataclass(frozen=True)
class World:
    """Where this process stands among the ranks of one training run.

    Attributes:
        rank: this rank's global index, ``0 <= rank < world_size``.
        world_size: ranks in the run, across all nodes.
        local_rank: this rank's index on its node; picks the GPU (``cuda:local_rank``).
        local_world_size: ranks on this node; divides the node's cores between them.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    def __post_init__(self) -> None:
        for name, size_name in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE")):
            value, size = getattr(self, name.lower()), getattr(self, size_name.lower())  # the variables' fields
            if size < 1:
                raise invalid(size_name, size, "at least 1")
            if not 0 <= value < size:
                raise invalid(name, value, f"in 0..{size - 1} ({size_name} {size})")

    @property
    def is_leader(self) -> bool:
        """Whether this is rank 0, the one that prints, checkpoints and saves."""
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "World":
        """The world ``torchrun`` describes in ``environ`` (default ``os.environ``).

        Missing variables take a single process's values: rank 0 of 1; ``LOCAL_WORLD_SIZE`` defaults to
        ``WORLD_SIZE`` (one node).

        Raises:
            ValueError: a variable that is not an integer, or facts that contradict each other
                (``Invalid RANK: 2. Must be in 0..1 (WORLD_SIZE 2).``).
        """
        env = os.environ if environ is None else environ
        defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": env.get("WORLD_SIZE", "1")}
        values = []
        for name, default in defaults.items():  # in the order of the fields
            try:
                values.append(int(env.get(name, default)))
            except ValueError:
                raise invalid(name, env[name], "an integer") from None
        return cls(*values)
