"""Per-rank loading: Parquet shards -> uint8 ``torch.Tensor`` batches, in one order for every world size.

Runs on every rank (inside ``TorchDistributor`` or any launcher); never touches Spark.  Two loaders yield the same
shapes:

* :class:`ShardLoader` (ours, the default) reads the Parquet files (petastorm's converter cache or ingest's shards)
  with pyarrow, decodes whole row groups at once from the binary column's contiguous buffer, and keeps the decoded
  rows it reads in memory when they fit ``memory_budget_bytes`` (later epochs are then pure array indexing); past
  the budget it streams them every epoch, one window (below) at a time.
* :func:`spark_mnist.rank.petastorm.petastorm_batches` wraps petastorm's
  ``make_torch_dataloader(cur_shard=rank, shard_count=world_size)`` (its own order; not elastic).

**The training order** (``drop_remainder=True``) is defined once for every world size, so that a run checkpointed on
``N`` ranks resumes on ``M`` (Mosaic Streaming's "elastic determinism"):

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
   (:meth:`ShardLoader.state_dict`).  Held to the same ``G`` on ``M`` ranks (``batch_size = G / M``), a loader
   resumes at global batch ``samples / G``: the rest of the epoch is exactly the samples not yet seen, each once,
   ``batch_size`` per rank per step; later epochs are the same sequences split ``M`` ways.

A window holds at most ``BLOCK_ROWS * WINDOW_BLOCKS`` (65,536) rows, 51 MB of 28x28 images, so streaming stays
bounded; a split of one window (MNIST's 60,000 rows) gets a uniform permutation.  A rank's slices of every global
batch spread over the whole split, so every rank reads every row: in memory it holds the whole decoded split
(``memory_budget_bytes`` is weighed against the split, not the rank's share); streaming, it decodes each window
once per epoch and keeps its slices of it.

**The evaluation order** (``drop_remainder=False``): rank ``r`` reads its contiguous range :func:`rank_rows` (sizes
differ by at most one) in file order, or permuted within each window-sized chunk by ``(seed, epoch, rank, chunk)``
with ``shuffle``, in batches of ``batch_size`` and a last short one: every row once over all ranks.  Its position
does not carry over to another world size.

Neither order depends on the memory budget or the number of reader threads (row groups are decoded in parallel but
consumed in plan order).
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from spark_mnist.errors import InputError, invalid
from spark_mnist.shards.parquet import DEFAULT_READER_THREADS, pieces_in, plan_row_groups, read_pieces, total_rows

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET_BYTES = 2 * 2**30
# Consecutive rows moved as one block by the first, coarse permutation of an epoch.
BLOCK_ROWS = 8_192
# Blocks whose rows are permuted together: a window, the unit streaming decodes (65,536 rows, 51 MB at 28x28).
WINDOW_BLOCKS = 8
WINDOW_ROWS = BLOCK_ROWS * WINDOW_BLOCKS
# Bytes a decoded row costs beside its pixels (index and label, int64 each).
ROW_OVERHEAD_BYTES = 16
# What a state_dict holds (see ShardLoader.state_dict).
STATE_KEYS = ("seed", "epoch", "step", "samples", "world_size", "batch_size", "global_batch_size", "rows", "shuffle",
              "drop_remainder", "dataset")
# The world sizes a resumed run is offered when its global batch does not split over the one asked for.
ELASTIC_WORLD_SIZES = range(1, 9)
# Stream tags of the order's random generators (the first word of their key after seed and epoch).
_BLOCKS, _WINDOW, _EVALUATION = 0, 1, 2


class LoaderStateError(InputError):
    """A loader state this loader cannot honour: another seed, dataset, row count or global batch size, or a
    global batch that the world size does not divide."""


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


def _permutation(n: int, seed: int, *key: int) -> np.ndarray:
    """A permutation of ``0..n-1`` (int64) drawn from PCG64 seeded by ``SeedSequence((seed, *key))``."""
    entropy = [seed % 2**64, *key]  # SeedSequence takes non-negative words; a negative seed wraps
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy))).permutation(n).astype(np.int64)


@dataclass(frozen=True)
class Window:
    """A run of an epoch's sequence: ``order`` (int64, (n,)), the global rows in sequence order, all of them in
    ``ranges`` (ascending, disjoint ``[a, b)`` global row ranges holding exactly those ``n`` rows)."""

    ranges: tuple[tuple[int, int], ...]
    order: np.ndarray


def _merged(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Ranges sorted, with touching ones joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


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
    windows = []
    for w, k in enumerate(range(0, len(blocks), WINDOW_BLOCKS)):
        chosen = blocks[k:k + WINDOW_BLOCKS]
        order = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in chosen])
        if shuffle:
            order = order[_permutation(len(order), seed, epoch, _WINDOW, w)]
        windows.append(Window(_merged(chosen), order))
    return windows


def rank_share(windows: Sequence[Window], rank: int, world_size: int, batch_size: int
               ) -> list[tuple[Window, np.ndarray]]:
    """Rank ``rank``'s part of the sequence ``windows`` make, cut into global batches (step 3 of the module
    docstring): for each window, the rows (int64) of the rank's slices that fall in it, in sequence order.  Their
    concatenation is the rank's epoch: ``steps_per_epoch(R, world_size, batch_size) * batch_size`` rows.

    Raises:
        ValueError: ``rank`` outside ``[0, world_size)`` or ``batch_size`` below 1.
    """
    rank_rows(0, rank, world_size)  # checks rank and world size
    if batch_size < 1:
        raise invalid("batch_size", batch_size, "at least 1")
    total = sum(len(w.order) for w in windows)
    global_batch = batch_size * world_size
    steps = steps_per_epoch(total, world_size, batch_size)
    positions = (np.arange(steps, dtype=np.int64)[:, None] * global_batch + rank * batch_size
                 + np.arange(batch_size, dtype=np.int64)[None, :]).ravel()
    out, start = [], 0
    for window in windows:
        end = start + len(window.order)
        lo, hi = np.searchsorted(positions, [start, end])
        out.append((window, window.order[positions[lo:hi] - start]))
        start = end
    return out


def _evaluation_windows(lo: int, hi: int, seed: int, epoch: int, rank: int, shuffle: bool) -> list[Window]:
    """The evaluation order of rows ``[lo, hi)``: chunks of :data:`WINDOW_ROWS`, each permuted with ``shuffle``."""
    windows = []
    for c, a in enumerate(range(lo, hi, WINDOW_ROWS)):
        b = min(hi, a + WINDOW_ROWS)
        order = np.arange(a, b, dtype=np.int64)
        if shuffle:
            order = order[_permutation(b - a, seed, epoch, _EVALUATION, rank, c)]
        windows.append(Window(((a, b),), order))
    return windows


def _local_positions(ranges: Sequence[tuple[int, int]], rows: np.ndarray) -> np.ndarray:
    """Where global ``rows`` (all inside ``ranges``) sit in the rows of ``ranges`` laid end to end."""
    starts = np.array([a for a, _ in ranges], dtype=np.int64)
    offsets = np.cumsum([0] + [b - a for a, b in ranges[:-1]], dtype=np.int64)
    k = np.searchsorted(starts, rows, side="right") - 1
    return offsets[k] + rows - starts[k]


def state_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any], source: str = "the saved state"
                   ) -> str | None:
    """The first fact of ``saved`` (a :meth:`ShardLoader.state_dict`) that a loader described by ``current`` cannot
    honour, as one line naming the setting, the saved value and this run's; ``None`` when it can resume.

    Refused: another dataset (when both name one), another row count, seed, ``shuffle`` or order
    (``drop_remainder``), another global batch size; for the evaluation order also another world size or batch
    size.  Another world size of the training order is honoured (elastic resume).
    """
    checks = [("dataset", "the dataset"), ("rows", "the split's rows"), ("seed", "the seed"),
              ("shuffle", "shuffle"), ("drop_remainder", "drop_remainder (training order)"),
              ("global_batch_size", "the global batch size")]
    if not current["drop_remainder"]:
        checks += [("world_size", "the world size"), ("batch_size", "the batch size")]
    for key, label in checks:
        a, b = saved[key], current[key]
        if key == "dataset" and (a is None or b is None):
            continue
        if a != b:
            detail = (f" (batch size {current['batch_size']} x {current['world_size']} ranks)"
                      if key == "global_batch_size" else "")
            return f"Cannot resume: {label} is {a!r} in {source}, {b!r} in this run{detail}."
    return None


def resume_batch_size(state: Mapping[str, Any], world_size: int, source: str = "the saved state") -> int:
    """The per-rank batch size that holds ``state``'s global batch over ``world_size`` ranks: ``G / world_size``.

    Raises:
        LoaderStateError: ``world_size`` does not divide the global batch; the message names the world sizes in
            1..8 that do.
    """
    global_batch = int(state["global_batch_size"])
    if world_size < 1 or global_batch % world_size:
        fits = [m for m in ELASTIC_WORLD_SIZES if global_batch % m == 0]
        raise LoaderStateError(f"Cannot resume: the global batch size {global_batch} of {source} does not split over "
                               f"{world_size} ranks; resume on one of {', '.join(map(str, fits))} ranks.")
    return global_batch // world_size


class ShardLoader:
    """Batches of one rank's exact share of a split, as uint8 tensors, in the order of the module docstring.

    Each iteration yields ``(images, labels)``: ``images`` uint8 of shape (B, 1, H, W) (pinned host memory when
    ``pin_memory``), ``labels`` int64 of shape (B,).  Scaling to float happens on the training device, after the
    copy (see :func:`spark_mnist.models.normalize`).

    Args:
        paths: the split's Parquet files (local paths or ``file:``/``dbfs:`` URLs), e.g. ``converter.file_urls``.
        rank, world_size: this rank and the number of ranks (``RANK``, ``WORLD_SIZE``).
        batch_size: samples per step, per rank; the global batch is ``batch_size * world_size``.
        image_shape: (H, W) of the contract's image column.
        seed: with the epoch, picks the epoch's order.
        shuffle: reshuffle each epoch (training); ``False`` keeps file order (evaluation).
        drop_remainder: ``True``: the training order (global batches, full steps only, elastic); ``False``: the
            evaluation order (every row of the rank's range once).
        memory_budget_bytes: keep the decoded rows the loader reads (the whole split for training, the rank's range
            for evaluation) in memory when they fit, else stream them every epoch.
        reader_threads: row groups decoded in parallel.
        pin_memory: return batches in pinned host memory, for ``non_blocking`` copies to a GPU.
        dataset: the dataset's identity (:func:`spark_mnist.runs.dataset_identity` of its manifest), recorded in
            :meth:`state_dict` so that a resume on other data is refused; ``None``: not checked.

    Where it runs: on every rank.  Use it as a context manager: ``close`` (on exit) ends open iterations, stopping
    and joining their background decoding thread, and releases the in-memory rows.  :meth:`state_dict` and
    :meth:`load_state_dict` save and restore the position and what decides the order, to resume mid-epoch, on
    another world size too.

    Raises:
        ValueError: ``batch_size`` below 1, ``rank`` outside ``[0, world_size)``.
        DatasetMismatchError: an image of another size than ``image_shape`` (when its row group is decoded).
    Source: the exact sharding of Spark's ``ml/torch/distributor.py`` docs (``RANK``/``WORLD_SIZE``), the state
    and elastic determinism of Mosaic Streaming's ``StreamingDataset``.
    """

    def __init__(self, paths: Sequence[str], *, rank: int, world_size: int, batch_size: int,
                 image_shape: tuple[int, int] = (28, 28), seed: int = 0, shuffle: bool = True,
                 drop_remainder: bool = True, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                 reader_threads: int = DEFAULT_READER_THREADS, pin_memory: bool = False, dataset: str | None = None):
        if batch_size < 1:
            raise invalid("batch_size", batch_size, "at least 1")
        self.plan = plan_row_groups(paths)
        self.total_rows = total_rows(self.plan)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.lo, self.hi = rank_rows(self.total_rows, rank, world_size)
        self.image_shape = tuple(image_shape)
        self.row_bytes = int(np.prod(self.image_shape))
        self.seed, self.shuffle, self.drop_remainder, self.dataset = seed, shuffle, drop_remainder, dataset
        self.reader_threads, self.pin_memory = reader_threads, pin_memory
        # The rows this loader reads: the whole split (training order) or the rank's range (evaluation order).
        self.span = (0, self.total_rows) if drop_remainder else (self.lo, self.hi)
        self.in_memory = self.rows * (self.row_bytes + ROW_OVERHEAD_BYTES) <= memory_budget_bytes
        self.epoch, self.start_step, self.step = 0, 0, 0
        self._cache = None
        self._iterators: weakref.WeakSet = weakref.WeakSet()  # the open iterations, closed by close()

    @property
    def rows(self) -> int:
        """Rows this loader reads every epoch: the split's (training order) or its rank's range (evaluation)."""
        return self.span[1] - self.span[0]

    @property
    def global_batch_size(self) -> int:
        """Samples per step over all ranks: ``batch_size * world_size``."""
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Steps in the current epoch (from ``start_step`` on)."""
        return self.steps_total - self.start_step

    @property
    def steps_total(self) -> int:
        """Steps in a whole epoch: equal on every rank when ``drop_remainder``."""
        if self.drop_remainder:
            return steps_per_epoch(self.total_rows, self.world_size, self.batch_size)
        return -(-(self.hi - self.lo) // self.batch_size)

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank yields in a whole epoch."""
        return self.steps_total * self.batch_size if self.drop_remainder else self.hi - self.lo

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch (its order) and the step to start from (to resume mid-epoch).

        Raises:
            ValueError: ``start_step`` outside ``0..steps_total``.
        """
        if not 0 <= start_step <= self.steps_total:
            raise invalid("start_step", start_step, f"in 0..{self.steps_total}")
        self.epoch, self.start_step, self.step = epoch, start_step, start_step

    def state_dict(self, *, epoch: int | None = None, step: int | None = None) -> dict[str, Any]:
        """Where the loader stands and everything that decides what comes next (Mosaic Streaming's pattern).

        Args:
            epoch, step: describe this position of the same order instead of the loader's own (a training loop
                that reads the batches through another reader, or checkpoints the next epoch's start).
        Returns:
            A dict of plain values: ``epoch`` (the epoch being read, from 0), ``step`` (its steps already yielded:
            the index of the next one, ``steps_total`` once the epoch is exhausted), ``samples`` (training order:
            the epoch's samples consumed over all ranks, ``step * global_batch_size``; evaluation order: this
            rank's, ``step * batch_size``), ``seed``, ``shuffle``, ``drop_remainder`` (the order), ``world_size``,
            ``batch_size`` (per rank), ``global_batch_size``, ``rows`` (the split's) and ``dataset`` (the identity
            given, or ``None``).  No samples and no order are held: they follow from these.
        """
        per_step = self.global_batch_size if self.drop_remainder else self.batch_size
        epoch, step = self.epoch if epoch is None else epoch, self.step if step is None else step
        return {"seed": self.seed, "epoch": epoch, "step": step, "samples": step * per_step,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "global_batch_size": self.global_batch_size, "rows": self.total_rows, "shuffle": self.shuffle,
                "drop_remainder": self.drop_remainder, "dataset": self.dataset}

    def load_state_dict(self, state: Mapping[str, Any], source: str = "the saved state") -> None:
        """Resume from :meth:`state_dict`'s output, maybe written on another world size: the next iteration starts
        at global batch ``samples / global_batch_size`` of ``epoch``, yielding exactly this rank's share of the
        samples that were not yet consumed.

        Args:
            state: a :meth:`state_dict`.
            source: what ``state`` came from, for the messages (a checkpoint's path).
        Raises:
            ValueError: a state without the keys of :data:`STATE_KEYS`, or a position outside the epoch.
            LoaderStateError: a state this loader cannot honour (:func:`state_mismatch`), in one line naming the
                setting, the saved value and this run's.
        """
        if not isinstance(state, Mapping) or not set(STATE_KEYS) <= set(state):
            raise invalid("loader state", state, f"a dict with {', '.join(STATE_KEYS)} (ShardLoader.state_dict())")
        mismatch = state_mismatch(state, self.state_dict(), source)
        if mismatch:
            raise LoaderStateError(mismatch)
        per_step = self.global_batch_size if self.drop_remainder else self.batch_size
        samples = int(state["samples"])
        if samples % per_step:
            raise invalid("samples", samples, f"a multiple of the samples per step {per_step} (in {source})")
        self.set_epoch(int(state["epoch"]), samples // per_step)

    def __enter__(self) -> "ShardLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End every iteration still open (their background decoding thread is stopped and joined before this
        returns) and release the in-memory rows.  Idempotent; a closed iteration yields nothing more."""
        for iterator in list(self._iterators):
            iterator.close()
        self._iterators.clear()
        self._cache = None

    def _read(self, ranges: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global rows of ``ranges``, end to end: ``(index (n,) int64, images (n, row_bytes) uint8, labels (n,)
        int64)``.  The one place this loader opens files."""
        pieces = [piece for a, b in ranges for piece in pieces_in(self.plan, a, b)]
        return read_pieces(pieces, self.row_bytes, self.reader_threads)

    def _epoch_share(self) -> list[tuple[Window, np.ndarray]]:
        """This rank's rows of the current epoch, window by window, in the order they are yielded."""
        if self.drop_remainder:
            windows = epoch_windows(self.total_rows, self.seed, self.epoch, self.shuffle)
            return rank_share(windows, self.rank, self.world_size, self.batch_size)
        return [(w, w.order) for w in _evaluation_windows(self.lo, self.hi, self.seed, self.epoch, self.rank,
                                                           self.shuffle)]

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
        share = self._skip(self._epoch_share(), self.start_step * self.batch_size)
        self.step = self.start_step
        batches = self._batches_from_memory(share) if self.in_memory else self._batches_streamed(share)
        with contextlib.closing(batches):  # closing this iteration closes the reader (and its thread) at once
            for batch in batches:
                self.step += 1
                yield batch if with_index else batch[1:]

    @staticmethod
    def _skip(share: list[tuple[Window, np.ndarray]], start: int) -> list[tuple[Window, np.ndarray]]:
        """``share`` without its first ``start`` rows (consumed before a resume) and without empty windows."""
        out = []
        for window, rows in share:
            taken = min(start, len(rows))
            start -= taken
            if len(rows) > taken:
                out.append((window, rows[taken:]))
        return out

    def _gather(self, arrays, positions: np.ndarray):
        """Rows ``positions`` of decoded ``arrays`` as tensors: (index (B,), images (B, 1, H, W), labels (B,))."""
        import torch

        index, images, labels = arrays
        out = torch.empty((len(positions), 1, *self.image_shape), dtype=torch.uint8, pin_memory=self.pin_memory)
        # numpy's take is a plain copy loop; torch.index_select would go through torch's OpenMP pool, whose
        # barrier stalls each batch when the other cores are busy (training, other ranks).
        np.take(images, positions, axis=0, out=out.numpy().reshape(len(positions), -1))
        return torch.from_numpy(index[positions]), out, torch.from_numpy(labels[positions])

    def _batches_from_memory(self, share):
        if self._cache is None:
            self._cache = self._read([self.span])
        if not share:
            return
        positions = np.concatenate([rows for _, rows in share]) - self.span[0]
        for lo in range(0, len(positions), self.batch_size):
            yield self._gather(self._cache, positions[lo:lo + self.batch_size])

    def _batches_streamed(self, share):
        """Decode the windows one at a time (the next one in the background while the current one is cut) and
        cut this rank's rows of each into batches, across window boundaries."""
        decoded = prefetched(lambda item: self._read(item[0].ranges), share)
        with contextlib.closing(decoded):  # stops and joins the prefetch thread when this generator is closed
            carry = None
            for (window, rows), arrays in zip(share, decoded):
                chunk = self._gather(arrays, _local_positions(window.ranges, rows))
                if carry is not None:
                    chunk = tuple(_cat(c, p) for c, p in zip(carry, chunk))
                full = len(chunk[0]) - len(chunk[0]) % self.batch_size
                for lo in range(0, full, self.batch_size):
                    yield tuple(t[lo:lo + self.batch_size] for t in chunk)
                carry = tuple(t[full:] for t in chunk) if full < len(chunk[0]) else None
            if carry is not None:
                yield carry


def _cat(a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":
    import torch

    return torch.cat([a, b])
