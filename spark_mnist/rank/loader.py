"""Per-rank loading: Parquet shards -> uint8 ``torch.Tensor`` batches, with exact DDP sharding.

Runs on every rank (inside ``TorchDistributor``); never touches Spark.  Two loaders honour the same contract:

* :class:`ShardLoader` (ours, the default) reads the Parquet files (petastorm's converter cache or ingest's shards)
  with pyarrow, decodes whole row groups at once from the binary column's contiguous buffer, and keeps the rank's
  decoded shard in memory when it fits ``memory_budget_bytes`` (later epochs are then pure tensor indexing);
  past the budget it streams row groups every epoch.
* :func:`spark_mnist.rank.petastorm.petastorm_batches` wraps petastorm's
  ``make_torch_dataloader(cur_shard=rank, shard_count=world_size)``.

Exact sharding (:func:`rank_rows`, :func:`steps_per_epoch`): the files' rows, in a fixed global order, are cut into
``world_size`` contiguous ranges whose sizes differ by at most one; every rank runs ``(N // world_size) //
batch_size`` steps per epoch.  The remainder that does not fill a step on every rank is **dropped**, a different
part of it each epoch because each rank reshuffles its range every epoch; it is smaller than
``world_size * batch_size`` rows.  Evaluation (``drop_remainder=False``) yields every row once, with a last short
batch per rank.

Order: given ``seed`` and the epoch, the order is reproducible, reshuffled every epoch, and independent of the
number of reader threads (row groups are decoded in parallel but consumed in plan order).  ``start_step`` skips the
first steps of an epoch (``load_state_dict`` sets it from ``state_dict``'s ``{"epoch", "step"}``), so a resumed run
sees exactly the samples the interrupted one had not yet seen.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from spark_mnist.errors import invalid
from spark_mnist.shards.parquet import (DEFAULT_READER_THREADS, pieces_in, plan_row_groups, read_pieces, read_rows,
                                        total_rows)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET_BYTES = 2 * 2**30
# Row groups shuffled together when streaming: more mixes better, costs memory.
STREAM_SHUFFLE_ROW_GROUPS = 4


def rank_rows(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """The global row range ``[lo, hi)`` of ``rank``: contiguous, sizes differ by at most one across ranks.

    Raises:
        ValueError: ``rank`` outside ``[0, world_size)``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise invalid("rank", rank, f"0 <= rank < world_size (world size {world_size!r})")
    return total * rank // world_size, total * (rank + 1) // world_size


def steps_per_epoch(total: int, world_size: int, batch_size: int) -> int:
    """Steps every rank runs per training epoch: ``(total // world_size) // batch_size``.

    The rows left over, ``total - steps * batch_size * world_size``, are fewer than ``world_size * batch_size``.
    """
    return (total // world_size) // batch_size


def prefetched(fn: Callable, items: Iterable) -> Iterator:
    """``fn(item)`` for each item, in order, each computed in a background thread while the previous result is
    consumed (one item ahead, never more).  Closing the iterator waits for the one in flight."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch") as pool:
        pending = None
        for item in items:
            future = pool.submit(fn, item)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


def epoch_generator(seed: int, epoch: int, rank: int):
    """The torch generator that orders ``rank``'s samples in ``epoch``."""
    import torch

    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + epoch) * 4_099 + rank)
    return generator


class ShardLoader:
    """Batches of one rank's exact share of a split, as uint8 tensors.

    Each iteration yields ``(images, labels)``: ``images`` uint8 of shape (B, 1, H, W) (pinned host memory when
    ``pin_memory``), ``labels`` int64 of shape (B,).  Scaling to float happens on the training device, after the
    copy (see :func:`spark_mnist.models.normalize`).

    Args:
        paths: the split's Parquet files (local paths or ``file:``/``dbfs:`` URLs), e.g. ``converter.file_urls``.
        rank, world_size: this rank and the number of ranks (``RANK``, ``WORLD_SIZE``).
        batch_size: samples per step, per rank.
        image_shape: (H, W) of the contract's image column.
        seed: orders every epoch; combined with epoch and rank.
        shuffle: reshuffle each epoch (training); ``False`` keeps file order (evaluation).
        drop_remainder: ``True`` for training (every rank the same number of full steps), ``False`` yields every
            row of the rank's range.
        memory_budget_bytes: keep the decoded shard in memory when it fits, else stream every epoch.
        reader_threads: row groups decoded in parallel.
        pin_memory: return batches in pinned host memory, for ``non_blocking`` copies to a GPU.

    Where it runs: on every rank.  Use it as a context manager: ``close`` (on exit) ends open iterations, stopping
    and joining their background decoding thread, and releases the in-memory shard.  :meth:`state_dict` and
    :meth:`load_state_dict` save and restore the position (epoch, step) to resume mid-epoch.

    Raises:
        ValueError: ``batch_size`` below 1, ``rank`` outside ``[0, world_size)``.
        DatasetMismatchError: an image of another size than ``image_shape`` (when its row group is decoded).
    Source: the exact sharding of Spark's ``ml/torch/distributor.py`` docs (``RANK``/``WORLD_SIZE``), the state of
    Mosaic Streaming's ``StreamingDataset``.
    """

    def __init__(self, paths: Sequence[str], *, rank: int, world_size: int, batch_size: int,
                 image_shape: tuple[int, int] = (28, 28), seed: int = 0, shuffle: bool = True,
                 drop_remainder: bool = True, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                 reader_threads: int = DEFAULT_READER_THREADS, pin_memory: bool = False):
        if batch_size < 1:
            raise invalid("batch_size", batch_size, "at least 1")
        self.plan = plan_row_groups(paths)
        self.total_rows = total_rows(self.plan)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.lo, self.hi = rank_rows(self.total_rows, rank, world_size)
        self.image_shape = tuple(image_shape)
        self.row_bytes = int(np.prod(self.image_shape))
        self.seed, self.shuffle, self.drop_remainder = seed, shuffle, drop_remainder
        self.reader_threads, self.pin_memory = reader_threads, pin_memory
        self.in_memory = (self.hi - self.lo) * (self.row_bytes + 16) <= memory_budget_bytes
        self.epoch, self.start_step, self.step = 0, 0, 0
        self._cache = None
        self._iterators: weakref.WeakSet = weakref.WeakSet()  # the open iterations, closed by close()

    @property
    def rows(self) -> int:
        """Rows in this rank's range."""
        return self.hi - self.lo

    def __len__(self) -> int:
        """Steps in the current epoch (from ``start_step`` on)."""
        return self.steps_total - self.start_step

    @property
    def steps_total(self) -> int:
        """Steps in a whole epoch: equal on every rank when ``drop_remainder``."""
        if self.drop_remainder:
            return steps_per_epoch(self.total_rows, self.world_size, self.batch_size)
        return -(-self.rows // self.batch_size)

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank yields in a whole epoch."""
        return self.steps_total * self.batch_size if self.drop_remainder else self.rows

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch (its order) and the step to start from (to resume mid-epoch).

        Raises:
            ValueError: ``start_step`` outside ``0..steps_total``.
        """
        if not 0 <= start_step <= self.steps_total:
            raise invalid("start_step", start_step, f"in 0..{self.steps_total}")
        self.epoch, self.start_step, self.step = epoch, start_step, start_step

    def state_dict(self) -> dict[str, int]:
        """Where the loader stands, to resume from (the Lightning / Mosaic Streaming pattern).

        Returns:
            ``{"epoch": int, "step": int}``: the epoch being read and the number of its steps already yielded
            (the index of the next step; ``steps_total`` once the epoch is exhausted).  The state holds no
            samples and no order: given the same files, ``world_size``, ``batch_size`` and ``seed`` (which a
            training checkpoint records and checks), the epoch and step determine the rest.
        """
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from :meth:`state_dict`'s output: the next iteration starts at ``state["step"]`` of
        ``state["epoch"]``, yielding exactly the samples that were not yet yielded.

        Raises:
            ValueError: a state without ``epoch`` and ``step``, or a step outside ``0..steps_total``.
        """
        if not isinstance(state, dict) or not {"epoch", "step"} <= set(state):
            raise invalid("loader state", state, "a dict with 'epoch' and 'step' (ShardLoader.state_dict())")
        self.set_epoch(int(state["epoch"]), int(state["step"]))

    def __enter__(self) -> "ShardLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End every iteration still open (their background decoding thread is stopped and joined before this
        returns) and release the in-memory shard.  Idempotent; a closed iteration yields nothing more."""
        for iterator in list(self._iterators):
            iterator.close()
        self._iterators.clear()
        self._cache = None

    def _order(self) -> "torch.Tensor":
        import torch

        if self.shuffle:
            return torch.randperm(self.rows, generator=epoch_generator(self.seed, self.epoch, self.rank))
        return torch.arange(self.rows)

    def _load(self):
        import torch

        if self._cache is None:
            index, images, labels = read_rows(self.plan, self.lo, self.hi, self.row_bytes, self.reader_threads)
            images_t = torch.from_numpy(images).view(-1, 1, *self.image_shape)
            if self.pin_memory:
                images_t = images_t.pin_memory()
            self._cache = (torch.from_numpy(index), images_t, torch.from_numpy(labels))
        return self._cache

    def __iter__(self) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
        """The epoch's batches from ``start_step`` on: ``(images, labels)``, see the class docstring."""
        return self._open(with_index=False)

    def iter_with_index(self) -> Iterator[tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]]:
        """Like iteration, with the ``index`` column (int64, (B,)) first: which source rows each batch holds."""
        return self._open(with_index=True)

    def _open(self, with_index: bool) -> Iterator:
        iterator = self._iterate(with_index)
        self._iterators.add(iterator)
        return iterator

    def _iterate(self, with_index: bool) -> Iterator:
        used = self.samples_per_epoch
        start = self.start_step * self.batch_size
        self.step = self.start_step
        batches = (self._batches_from_memory(self._order(), start, used) if self.in_memory
                   else self._batches_streamed(start, used))
        with contextlib.closing(batches):  # closing this iteration closes the reader (and its thread) at once
            for batch in batches:
                self.step += 1
                yield batch if with_index else batch[1:]

    def _gather(self, tensors, positions):
        import torch

        index, images, labels = tensors
        out = torch.empty((len(positions), 1, *self.image_shape), dtype=torch.uint8, pin_memory=self.pin_memory)
        # numpy's take is a plain copy loop; torch.index_select would go through torch's OpenMP pool, whose
        # barrier stalls each batch when the other cores are busy (training, other ranks).
        np.take(images.numpy(), positions.numpy(), axis=0, out=out.numpy())
        return index[positions], out, labels[positions]

    def _batches_from_memory(self, order, start: int, used: int):
        tensors = self._load()
        for lo in range(start, used, self.batch_size):
            yield self._gather(tensors, order[lo:min(used, lo + self.batch_size)])

    def _batches_streamed(self, start: int, used: int):
        """Stream the rank's range: its row-group pieces in a seeded order, shuffled within windows of
        :data:`STREAM_SHUFFLE_ROW_GROUPS` pieces, cut into batches across window boundaries.  The next window is
        decoded in the background while the current one is consumed."""
        import torch

        pieces = pieces_in(self.plan, self.lo, self.hi)
        if self.shuffle:
            generator = epoch_generator(self.seed, self.epoch, self.rank)
            pieces = [pieces[i] for i in torch.randperm(len(pieces), generator=generator).tolist()]
        windows, position = [], 0  # (number, pieces, first row, end row) of the windows this epoch still needs
        for w, w_lo in enumerate(range(0, len(pieces), STREAM_SHUFFLE_ROW_GROUPS)):
            window = pieces[w_lo:w_lo + STREAM_SHUFFLE_ROW_GROUPS]
            w_start, position = position, position + sum(b - a for _, a, b in window)
            if position > start and w_start < used:  # resuming: earlier windows were consumed before
                windows.append((w, window, w_start, position))
        decoded = prefetched(self._decode_pieces, [window for _, window, _, _ in windows])
        with contextlib.closing(decoded):  # stops and joins the prefetch thread when this generator is closed
            yield from self._cut_windows(windows, decoded, start, used)

    def _cut_windows(self, windows, decoded, start: int, used: int):
        """Batches of ``batch_size`` cut across the decoded windows, each window shuffled within."""
        import torch

        carry = None
        for (w, _, w_start, w_end), tensors in zip(windows, decoded):
            rows = w_end - w_start
            inner = (torch.randperm(rows, generator=epoch_generator(self.seed, self.epoch, self.rank * 65_537 + w + 1))
                     if self.shuffle else torch.arange(rows))
            keep = inner[max(start, w_start) - w_start:min(used, w_end) - w_start]
            if carry is not None:  # complete the batch begun in the previous window
                need = self.batch_size - len(carry[0])
                head = tuple(torch.cat([c, p]) for c, p in zip(carry, self._gather(tensors, keep[:need])))
                keep = keep[need:]
                if len(head[0]) < self.batch_size:
                    carry = head
                    continue
                yield head
            full = len(keep) - len(keep) % self.batch_size
            for lo in range(0, full, self.batch_size):
                yield self._gather(tensors, keep[lo:lo + self.batch_size])
            carry = self._gather(tensors, keep[full:]) if full < len(keep) else None
        if carry is not None:
            yield carry

    def _decode_pieces(self, pieces):
        """Decode ``(row group, a, b)`` pieces into (index, images (n,1,H,W), labels) tensors."""
        import torch

        index, images, labels = read_pieces(pieces, self.row_bytes, self.reader_threads)
        return (torch.from_numpy(index), torch.from_numpy(images).view(-1, 1, *self.image_shape),
                torch.from_numpy(labels))
