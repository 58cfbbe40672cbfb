"""The loaders' orders: which rows each rank reads, in which order, every epoch, and what a saved position
must match to resume; used on every rank.  Pure functions of the row count, seed, epoch, world size and batch size:
no I/O, no torch (:class:`spark_mnist.rank.loader.ShardLoader` reads the rows they name).  Why the order is built
this way, and what it costs a rank's memory: docs/concepts/training.md.

**The training order** (``drop_remainder=True``) is defined once for every world size, so that a run checkpointed on
``N`` ranks resumes on ``M``:

1. The split's ``R`` rows are numbered in the global order: files sorted by name, rows in file order.
2. The epoch's sequence ``S``, a permutation of ``0..R-1``, depends only on ``R``, ``seed`` and the epoch
   (:func:`epoch_windows`): the rows are cut into blocks of :data:`BLOCK_ROWS` consecutive rows; the blocks are
   permuted by ``(seed, epoch)``; each run of :data:`WINDOW_BLOCKS` consecutive permuted blocks is a window; the
   rows of window ``w`` are permuted by ``(seed, epoch, w)``; ``S`` is the windows one after the other.  Without
   ``shuffle``, ``S`` is ``0..R-1``.  (numpy's PCG64 seeded through ``SeedSequence``.)
3. ``S`` is consumed in global batches of ``G = batch_size * world_size`` samples.  An epoch has ``R // G`` steps
   (:func:`steps_per_epoch`); global batch ``b`` is ``S[b*G:(b+1)*G]`` and rank ``r`` takes its ``r``-th slice of
   it, ``S[b*G + r*batch_size : b*G + (r+1)*batch_size]`` (:func:`rank_share`).  The tail ``S[(R//G)*G:]``, fewer
   than ``G`` rows, is **dropped**: another set of rows every epoch, the same set for every world size.
4. The position is ``(epoch, samples)``: the samples of ``S`` consumed, a multiple of ``G``
   (:meth:`~spark_mnist.rank.loader.ShardLoader.state_dict`).  Held to the same ``G`` on ``M`` ranks
   (``batch_size = G / M``), a loader resumes at global batch ``samples / G``: the rest of the epoch is exactly the
   samples not yet seen, each once, ``batch_size`` per rank per step; later epochs are the same sequences split
   ``M`` ways.

A rank's slices of every global batch spread over the whole split: every rank reads every row.

**The evaluation order** (``drop_remainder=False``): rank ``r`` reads its contiguous range :func:`rank_rows` (sizes
differ by at most one) in file order, or permuted within each window-sized chunk by ``(seed, epoch, rank, chunk)``
with ``shuffle``, in batches of ``batch_size`` and a last short one: every row once over all ranks.  Its position
does not carry over to another world size.

Neither order depends on the memory budget or the number of reader threads (row groups are decoded in parallel but
consumed in plan order).
"""

from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from spark_mnist.errors import invalid

__all__ = ["BLOCK_ROWS", "WINDOW_BLOCKS", "WINDOW_ROWS", "STATE_KEYS", "rank_rows", "steps_per_epoch", "Window",
           "epoch_windows", "evaluation_windows", "rank_positions", "rank_share", "state_mismatch"]  # fmt: skip

# Consecutive rows moved as one block by the first, coarse permutation of an epoch.
BLOCK_ROWS = 8_192
# Blocks whose rows are permuted together: a window, the unit streaming decodes (65,536 rows, 51 MB at 28x28).
WINDOW_BLOCKS = 8
WINDOW_ROWS = BLOCK_ROWS * WINDOW_BLOCKS
# What a state_dict holds (see ShardLoader.state_dict).
STATE_KEYS = tuple(
    "seed epoch step samples world_size batch_size global_batch_size rows shuffle drop_remainder dataset".split()
)
# How the messages of state_mismatch name the facts of a state whose key does not say it as is ("the seed", ...).
_LABELS = {"rows": "the split's rows", "shuffle": "shuffle", "drop_remainder": "drop_remainder (training order)"}
# Stream tags of the order's random generators (the first word of their key after seed and epoch).
_BLOCKS, _WINDOW, _EVALUATION = 0, 1, 2


def rank_rows(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """The global row range ``[lo, hi)`` of ``rank``: contiguous, sizes differ by at most one across ranks.

    Raises:
        ValueError: ``rank`` outside ``[0, world_size)``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise invalid("rank", rank, f"0 <= rank < world_size (world size {world_size!r})")
    return total * rank // world_size, total * (rank + 1) // world_size


def steps_per_epoch(total: int, world_size: int, batch_size: int) -> int:
    """Steps every rank runs per training epoch: ``total // (world_size * batch_size)``, one per global batch.

    The rows left over, ``total - steps * batch_size * world_size``, are fewer than one global batch.
    """
    return total // (world_size * batch_size)


def _permutation(n: int, seed: int, *key: int) -> np.ndarray:
    """A permutation of ``0..n-1`` (int64) drawn from PCG64 seeded by ``SeedSequence((seed, *key))`` (what
    ``default_rng`` makes of a list of words)."""
    # SeedSequence takes non-negative words; a negative seed wraps.
    return np.random.default_rng([seed % 2**64, *key]).permutation(n).astype(np.int64)


# A run of an epoch's sequence: ``order`` (int64, (n,)), the global rows in sequence order, all of them in ``ranges``
# (ascending, disjoint ``[a, b)`` global row ranges holding exactly those ``n`` rows).
Window = NamedTuple("Window", [("ranges", tuple[tuple[int, int], ...]), ("order", np.ndarray)])


def _window(ranges: Sequence[tuple[int, int]], shuffle: bool, seed: int, *key: int) -> Window:
    """The window of the rows of ``ranges``: in their order, or (``shuffle``) permuted by ``(seed, *key)``; its
    ``ranges`` sorted, with touching ones joined."""
    order = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])
    merged: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if merged and merged[-1][1] == a:
            a = merged.pop()[0]
        merged.append((a, b))
    return Window(tuple(merged), order[_permutation(len(order), seed, *key)] if shuffle else order)


def epoch_windows(rows: int, seed: int, epoch: int, shuffle: bool = True) -> list[Window]:
    """The training order's sequence ``S`` of one epoch, as its windows (step 2 of the module docstring).

    Args:
        rows: ``R``, the split's rows.
        seed, epoch: pick the permutations; nothing else does (not the world size, rank or batch size).
        shuffle: ``False`` gives ``0..R-1`` (in windows of :data:`WINDOW_ROWS`).
    Returns:
        The windows in sequence order; their ``order`` arrays, concatenated, are a permutation of ``0..R-1``.
    """
    blocks = [(lo, min(rows, lo + BLOCK_ROWS)) for lo in range(0, rows, BLOCK_ROWS)]
    if shuffle:
        blocks = [blocks[k] for k in _permutation(len(blocks), seed, epoch, _BLOCKS)]
    starts = range(0, len(blocks), WINDOW_BLOCKS)
    return [_window(blocks[k : k + WINDOW_BLOCKS], shuffle, seed, epoch, _WINDOW, w) for w, k in enumerate(starts)]


def evaluation_windows(lo: int, hi: int, seed: int, epoch: int, rank: int, shuffle: bool) -> list[Window]:
    """The evaluation order of rows ``[lo, hi)``: chunks of :data:`WINDOW_ROWS`, each permuted with ``shuffle``."""
    chunks = [(a, min(hi, a + WINDOW_ROWS)) for a in range(lo, hi, WINDOW_ROWS)]
    return [_window([chunk], shuffle, seed, epoch, _EVALUATION, rank, c) for c, chunk in enumerate(chunks)]


def rank_positions(total: int, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """Where rank ``rank``'s slices of the global batches lie in the training order's sequence ``S`` of ``total``
    rows (step 3 of the module docstring): int64, ascending, ``steps_per_epoch(total, world_size, batch_size) *
    batch_size`` of them, the rank's epoch in the order it reads it."""
    starts = np.arange(steps_per_epoch(total, world_size, batch_size), dtype=np.int64) * (batch_size * world_size)
    return (starts[:, None] + rank * batch_size + np.arange(batch_size)).ravel()


def rank_share(windows: Sequence[Window], positions: np.ndarray) -> list[tuple[Window, np.ndarray]]:
    """The rows (int64) at ``positions`` (ascending indices into the sequence ``windows`` make: a rank's
    :func:`rank_positions`, or ``arange`` in the evaluation order, less those consumed before a resume), window by
    window in sequence order; windows that hold none of them are left out."""
    out, start = [], 0
    for window in windows:
        end = start + len(window.order)
        lo, hi = np.searchsorted(positions, [start, end])
        if hi > lo:
            out.append((window, window.order[positions[lo:hi] - start]))
        start = end
    return out


def state_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any], source: str = "the saved state") -> str | None:
    """The first fact of ``saved`` (a :meth:`~spark_mnist.rank.loader.ShardLoader.state_dict`) that a loader
    described by ``current`` cannot honour, as one line naming the setting, the saved value and this run's; ``None``
    when it can resume.

    Refused: another dataset (when both name one), another row count, seed, ``shuffle`` or order
    (``drop_remainder``), another global batch size; for the evaluation order also another world size or batch
    size.  Another world size of the training order is honoured (elastic resume).
    """
    # The evaluation order's position does not carry over to another world size or batch size.
    evaluation = [] if current["drop_remainder"] else ["world_size", "batch_size"]
    for key in ["dataset", "rows", "seed", "shuffle", "drop_remainder", "global_batch_size", *evaluation]:
        a, b = saved[key], current[key]
        if a != b and not (key == "dataset" and None in (a, b)):
            label = _LABELS.get(key, f"the {key.replace('_', ' ')}")
            ranks = f" (batch size {current['batch_size']} x {current['world_size']} ranks)"
            detail = ranks if key == "global_batch_size" else ""
            return f"Cannot resume: {label} is {a!r} in {source}, {b!r} in this run{detail}."
    return None
