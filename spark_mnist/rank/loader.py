"""Per-rank loading: Parquet shards -> uint8 ``torch.Tensor`` batches, in one order for every world size.

Runs on every rank (inside ``TorchDistributor`` or any launcher); never touches Spark.  See
docs/concepts/training.md.  Two loaders yield the same
shapes:

* :class:`ShardLoader` (ours, the default) reads the Parquet files (petastorm's converter cache or ingest's shards)
  with pyarrow, decodes whole row groups at once from the binary column's contiguous buffer, and keeps the decoded
  rows it reads in memory when they fit ``memory_budget_bytes`` (later epochs are then pure array indexing); past
  the budget it streams them every epoch, one window at a time.  It is a ``torch.utils.data.IterableDataset``:
  iterate it directly, or hand it to ``DataLoader(loader, batch_size=None)`` (``num_workers=0``).
* :func:`spark_mnist.rank.petastorm.petastorm_batches` wraps petastorm's
  ``make_torch_dataloader(cur_shard=rank, shard_count=world_size)`` (its own order; not elastic).

The orders, training (elastic: the same global batches on every world size) and evaluation (every row once), are
defined in :mod:`spark_mnist.rank.order`.
"""

import contextlib
import logging
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Generator, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from spark_mnist.errors import InputError, LoaderStateError, invalid
from spark_mnist.rank import order
from spark_mnist.rank.order import STATE_KEYS
from spark_mnist.shards.parquet import DEFAULT_READER_THREADS, pieces_in, plan_row_groups, read_pieces, total_rows

__all__ = ["DEFAULT_MEMORY_BUDGET_BYTES", "ROW_OVERHEAD_BYTES", "CUDA_FREE_MEMORY_SHARE", "prefetched", "ShardLoader"]

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET_BYTES = 2 * 2**30
# Bytes a decoded row costs beside its pixels (index and label, int64 each).
ROW_OVERHEAD_BYTES = 16
# The share of a CUDA device's free memory a loader may fill with its resident split by default: the model, its
# activations and the optimizer need the rest.
CUDA_FREE_MEMORY_SHARE = 0.25


def prefetched(fn: Callable, items: Iterable) -> Iterator:
    """``fn(item)`` for each item, in order, each computed in a background thread while the previous result is
    consumed (one item ahead, never more).  Closing the iterator waits for the one in flight."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch") as pool:
        pending: list = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > 1:
                yield pending.pop(0).result()
        yield from (future.result() for future in pending)


class ShardLoader(IterableDataset):
    """Batches of one rank's exact share of a split, as uint8 tensors, in the orders of :mod:`spark_mnist.rank.order`.

    Each iteration yields ``(images, labels)``: ``images`` uint8 of shape (B, 1, H, W) (pinned host memory when
    ``pin_memory``), ``labels`` int64 of shape (B,).  Scaling to float happens on the training device, after the
    copy (see :func:`spark_mnist.models.normalize`).  With ``device``, the tensors are on that device, the decoded
    rows kept there when they fit (``resident``: decoded once, the first epoch, then every batch an index gather on
    the device, with no host-to-device copy per step), else each host batch copied there (``non_blocking`` from pinned
    memory on CUDA), which a warning says once; the batches are the same either way.

    **Epochs.**  Every ``iter()`` (or :meth:`iter_with_index`) is one epoch, as with a ``DataLoader``: a plain
    ``for epoch in range(n): for batch in loader:`` reads epochs 0, 1, ... ``n - 1``, each in its own order (epoch
    ``k``'s is the one ``set_epoch(k)`` selects).  The position that :meth:`set_epoch` or :meth:`load_state_dict`
    (or construction: epoch 0, step 0) sets is where the next ``iter()`` starts; each later ``iter()`` starts the
    epoch after the last one begun, at step 0, whether that one was read to its end or not.  So ``set_epoch(e)``
    still wins (the next ``iter()`` reads epoch ``e``, the one after ``e + 1``), and after
    ``load_state_dict(state)`` the next ``iter()`` yields the rest of the saved epoch (nothing when it was saved at
    its end: resume a loop at ``state["epoch"]``), the one after it the next epoch from step 0.

    **As a dataset.**  A ``torch.utils.data.IterableDataset``: ``DataLoader(loader, batch_size=None)`` yields the
    same batches (as ``[images, labels]`` lists, ``DataLoader``'s conversion of a tuple).  ``num_workers`` must stay
    0: the loader decodes in its own reader threads, and a copy in each worker process would yield every batch once
    per worker; iterating in a worker raises :class:`~spark_mnist.errors.InputError`.

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
        device: yield the batches on this device (``None``: host tensors, as without it); keep the decoded rows
            there when they fit ``device_memory_budget_bytes``, else copy each host batch (pinned on CUDA) and log
            that once.
        device_memory_budget_bytes: default on CUDA ``CUDA_FREE_MEMORY_SHARE`` (a quarter) of the device's free memory
            (``torch.cuda.mem_get_info``) when the loader is built; on the CPU (standing in for a device, in tests
            and benchmarks) or another device type ``memory_budget_bytes``.
        dataset: the dataset's identity (:func:`spark_mnist.runs.dataset_identity` of its manifest), recorded in
            :meth:`state_dict` so that a resume on other data is refused; ``None``: not checked.

    Attributes:
        rank, world_size, batch_size, seed, shuffle, drop_remainder, dataset, device: as given.
        total_rows: the split's rows.
        rows: the rows this loader reads every epoch: the whole split (training order, ``[0, total_rows)``) or the
            rank's range (evaluation order, ``span``).
        global_batch_size: the samples of one step over all ranks, ``batch_size * world_size``.
        steps_total: the steps of a whole epoch, equal on every rank when ``drop_remainder``.
        in_memory, resident: the rows read are kept between epochs on the host, or on ``device``.
        epoch, start_step, step: the epoch being (or next to be) read, the step its iteration starts at, and its
            steps already yielded.

    Where it runs: on every rank.  Use it as a context manager: ``close`` (on exit) ends open iterations, stopping
    and joining their background decoding thread, and releases the in-memory rows.  :meth:`state_dict` and
    :meth:`load_state_dict` save and restore the position and what decides the order, to resume mid-epoch, on
    another world size too.

    Raises:
        ValueError: ``batch_size`` below 1, ``rank`` outside ``[0, world_size)``.
        DatasetMismatchError: an image of another size than ``image_shape`` (when its row group is decoded).
        InputError: iterated in a ``DataLoader`` worker process (``num_workers`` above 0).
    Source: the exact sharding of Spark's ``ml/torch/distributor.py`` docs (``RANK``/``WORLD_SIZE``), the state
    and elastic determinism of Mosaic Streaming's ``StreamingDataset``.
    """

    def __init__(
        self,
        paths: Sequence[str],
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        image_shape: tuple[int, int] = (28, 28),
        seed: int = 0,
        shuffle: bool = True,
        drop_remainder: bool = True,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        reader_threads: int = DEFAULT_READER_THREADS,
        pin_memory: bool = False,
        dataset: str | None = None,
        device: torch.device | str | None = None,
        device_memory_budget_bytes: int | None = None,
    ):
        if batch_size < 1:
            raise invalid("batch_size", batch_size, "at least 1")
        self.plan = plan_row_groups(paths)
        self.total_rows = total_rows(self.plan)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.lo, self.hi = order.rank_rows(self.total_rows, rank, world_size)
        self.image_shape = tuple(image_shape)
        self.row_bytes = int(np.prod(self.image_shape))
        self.seed, self.shuffle, self.drop_remainder, self.dataset = seed, shuffle, drop_remainder, dataset
        self.reader_threads, self.pin_memory = reader_threads, pin_memory
        self.span = (0, self.total_rows) if drop_remainder else (self.lo, self.hi)
        self.rows = self.span[1] - self.span[0]
        self.global_batch_size = batch_size * world_size
        # Samples of one step: the global batch in the training order (it counts all ranks'), else this rank's.
        self._per_step = self.global_batch_size if drop_remainder else batch_size
        steps = order.steps_per_epoch(self.total_rows, world_size, batch_size)
        self.steps_total = steps if drop_remainder else -(-self.rows // batch_size)
        need = self.rows * (self.row_bytes + ROW_OVERHEAD_BYTES)
        self.in_memory = need <= memory_budget_bytes
        self.device = None if device is None else torch.device(device)
        budget = memory_budget_bytes if device_memory_budget_bytes is None else device_memory_budget_bytes
        if device_memory_budget_bytes is None and self.device is not None and self.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(self.device)[0] * CUDA_FREE_MEMORY_SHARE)
        self.resident = self.device is not None and need <= budget  # the decoded rows live on self.device
        if self.device is not None and not self.resident:
            self.pin_memory = self.pin_memory or self.device.type == "cuda"
            log.warning(
                f"rank {rank}: the {self.rows} rows read every epoch ({need // 2**20} MB decoded) do not fit the "
                f"{budget // 2**20} MB budget on {self.device}: batches are made on the host and copied there"
            )
        # _position_set: True while the next iter() starts at (epoch, start_step), as set_epoch / load_state_dict /
        # __init__ left them; False once an iteration began there: the next iter() starts the epoch after, at step 0.
        self.set_epoch(0)
        # The decoded rows kept between epochs: host arrays (in_memory), or tensors on the device (resident).
        self._cache: Any = None
        self._iterators: weakref.WeakSet = weakref.WeakSet()  # the open iterations, closed by close()

    def __len__(self) -> int:
        """Steps the next ``iter()`` yields: the rest of the epoch :meth:`set_epoch` or :meth:`load_state_dict`
        chose (from ``start_step`` on), else a whole epoch (``steps_total``)."""
        return self.steps_total - (self.start_step if self._position_set else 0)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch (its order) and the step the next ``iter()`` starts from (to resume mid-epoch); the
        ``iter()`` after that reads epoch ``epoch + 1`` from step 0 (see the class docstring).

        Raises:
            ValueError: ``start_step`` outside ``0..steps_total``.
        """
        if not 0 <= start_step <= self.steps_total:
            raise invalid("start_step", start_step, f"in 0..{self.steps_total}")
        self.epoch, self.start_step, self.step = epoch, start_step, start_step
        self._position_set = True

    def state_dict(self, *, epoch: int | None = None, step: int | None = None) -> dict[str, Any]:
        """Where the loader stands and everything that decides what comes next (Mosaic Streaming's pattern).

        Args:
            epoch, step: describe this position of the same order instead of the loader's own (a training loop
                that reads the batches through another reader, or checkpoints the next epoch's start).
        Returns:
            dict: plain values, ``epoch`` (the epoch being read, from 0), ``step`` (its steps already yielded:
            the index of the next one, ``steps_total`` once the epoch is exhausted), ``samples`` (training order:
            the epoch's samples consumed over all ranks, ``step * global_batch_size``; evaluation order: this
            rank's, ``step * batch_size``), ``seed``, ``shuffle``, ``drop_remainder`` (the order), ``world_size``,
            ``batch_size`` (per rank), ``global_batch_size``, ``rows`` (the split's) and ``dataset`` (the identity
            given, or ``None``).  No samples and no order are held: they follow from these.
        """
        epoch, step = self.epoch if epoch is None else epoch, self.step if step is None else step
        # The facts that are not the loader's attribute of the same name; STATE_KEYS orders them all.
        position = {"epoch": epoch, "step": step, "samples": step * self._per_step, "rows": self.total_rows}
        return {key: position[key] if key in position else getattr(self, key) for key in STATE_KEYS}

    def load_state_dict(self, state: Mapping[str, Any], source: str = "the saved state") -> None:
        """Resume from :meth:`state_dict`'s output, maybe written on another world size: the next iteration starts
        at global batch ``samples / global_batch_size`` of ``epoch``, yielding exactly this rank's share of the
        samples that were not yet consumed; the iteration after it reads epoch ``epoch + 1`` from step 0.

        Args:
            state: a :meth:`state_dict`.
            source: what ``state`` came from, for the messages (a checkpoint's path).
        Raises:
            ValueError: a state without the keys of :data:`spark_mnist.rank.order.STATE_KEYS`, or a position
                outside the epoch.
            LoaderStateError: a state this loader cannot honour (:func:`spark_mnist.rank.order.state_mismatch`), in
                one line naming the setting, the saved value and this run's.
        """
        if not isinstance(state, Mapping) or not set(STATE_KEYS) <= set(state):
            raise invalid("loader state", state, f"a dict with {', '.join(STATE_KEYS)} (ShardLoader.state_dict())")
        if mismatch := order.state_mismatch(state, self.state_dict(), source):
            raise LoaderStateError(mismatch)
        samples = int(state["samples"])
        if samples % self._per_step:
            raise invalid("samples", samples, f"a multiple of the samples per step {self._per_step} (in {source})")
        self.set_epoch(int(state["epoch"]), samples // self._per_step)

    def __getstate__(self) -> dict[str, Any]:
        """A pickled (or deep-copied) loader carries its settings and position, not its open iterations or its
        decoded rows: ``DataLoader`` workers started by ``spawn`` or ``forkserver`` then reach the refusal of
        :meth:`__iter__`, not a pickling error."""
        return {**self.__dict__, "_iterators": None, "_cache": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _iterators=weakref.WeakSet())

    def __enter__(self) -> "ShardLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End every iteration still open (their background decoding thread is stopped and joined before this
        returns) and release the in-memory rows.  Idempotent; a closed iteration yields nothing more."""
        for iterator in list(self._iterators):
            iterator.close()
        self._cache = None

    def _read(self, ranges: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global rows of ``ranges``, end to end: ``(index (n,) int64, images (n, row_bytes) uint8, labels (n,)
        int64)``.  The one place this loader opens files."""
        pieces = [piece for a, b in ranges for piece in pieces_in(self.plan, a, b)]
        return read_pieces(pieces, self.row_bytes, self.reader_threads)

    def __iter__(self) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        """One epoch's batches, ``(images, labels)``: the position set by :meth:`set_epoch` /
        :meth:`load_state_dict` on, else the next epoch's from step 0 (see the class docstring).

        Raises:
            InputError: called in a ``DataLoader`` worker process (``num_workers`` above 0).
        """
        return self._open(with_index=False)

    def iter_with_index(self) -> Generator[tuple[torch.Tensor, torch.Tensor, torch.Tensor], None, None]:
        """Like iteration (one epoch, advancing as ``iter()`` does), with the ``index`` column (int64, (B,)) first:
        which source rows each batch holds."""
        return self._open(with_index=True)

    def _open(self, with_index: bool) -> Generator:
        """Begin an epoch's iteration now: which epoch and step are fixed here, not at the first ``next()``."""
        if (worker := get_worker_info()) is not None:
            must = "0 for a spark_mnist loader (DataLoader(loader, batch_size=None)): it decodes in its own "
            must += "reader threads, and each worker would yield every batch again"
            raise invalid("DataLoader num_workers", worker.num_workers, must, InputError)
        if not self._position_set:
            self.epoch, self.start_step = self.epoch + 1, 0
        self._position_set = False
        self.step = self.start_step
        iterator = self._iterate(with_index, self.epoch, self.start_step)
        self._iterators.add(iterator)
        return iterator

    def _iterate(self, with_index: bool, epoch: int, start_step: int) -> Generator:
        # This rank's rows of the epoch from the start step on, window by window, in the order they are yielded.
        if self.drop_remainder:
            windows = order.epoch_windows(self.total_rows, self.seed, epoch, self.shuffle)
            positions = order.rank_positions(self.total_rows, self.rank, self.world_size, self.batch_size)
        else:
            windows = order.evaluation_windows(*self.span, self.seed, epoch, self.rank, self.shuffle)
            positions = np.arange(self.rows)
        share = order.rank_share(windows, positions[start_step * self.batch_size :])
        batches = self._batches_kept(share) if self.in_memory or self.resident else self._batches_streamed(share)
        with contextlib.closing(batches):  # closing this iteration closes the reader (and its thread) at once
            for batch in batches:
                self.step += 1
                if self.device is not None:  # host batches copied (no copy for resident ones, already there)
                    batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
                yield batch if with_index else batch[1:]

    def _gather(self, arrays, positions: Any):
        """Rows ``positions`` of decoded ``arrays`` as tensors: (index (B,), images (B, 1, H, W), labels (B,)).  Of the
        rows kept on the device (``resident``), one ``index_select`` per tensor, there."""
        if self.resident:
            return tuple(torch.index_select(t, 0, positions) for t in arrays)
        index, images, labels = arrays
        out = torch.empty((len(positions), 1, *self.image_shape), dtype=torch.uint8, pin_memory=self.pin_memory)
        # numpy's take is a plain copy loop; torch.index_select would go through torch's OpenMP pool, whose
        # barrier stalls each batch when the other cores are busy (training, other ranks).
        np.take(images, positions, axis=0, out=out.numpy().reshape(len(positions), -1))
        return self._pinned(torch.from_numpy(index[positions])), out, self._pinned(torch.from_numpy(labels[positions]))

    def _pinned(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in pinned host memory where batches are pinned (so its ``non_blocking`` copy stays async)."""
        return tensor.pin_memory() if self.pin_memory else tensor

    def _batches_kept(self, share):
        """Batches of the rows read once (the first epoch) and kept: gathered on the host (``in_memory``), or on
        ``device`` (``resident``: the rows moved there as one uint8 image tensor and two int64 tensors, the epoch's
        positions too, then one ``index_select`` per tensor per batch: no host-to-device copy per step)."""
        if self._cache is None:
            self._cache = self._read([self.span])
            if self.resident:
                index, images, labels = (torch.from_numpy(a).to(self.device) for a in self._cache)
                self._cache = index, images.view(len(images), 1, *self.image_shape), labels
        # No share: resumed at the epoch's end.
        positions = np.concatenate([np.empty(0, np.int64), *(rows for _, rows in share)]) - self.span[0]
        if self.resident:
            positions = torch.from_numpy(positions).to(self.device)
        for lo in range(0, len(positions), self.batch_size):
            yield self._gather(self._cache, positions[lo : lo + self.batch_size])

    def _batches_streamed(self, share):
        """Decode the windows one at a time (the next one in the background while the current one is cut) and
        cut this rank's rows of each into batches, across window boundaries."""
        decoded = prefetched(lambda item: self._read(item[0].ranges), share)
        with contextlib.closing(decoded):  # stops and joins the prefetch thread when this generator is closed
            carry = None
            for (window, rows), arrays in zip(share, decoded):
                laid_out = np.concatenate([np.arange(a, b) for a, b in window.ranges])  # the rows as _read decodes them
                chunk = self._gather(arrays, np.searchsorted(laid_out, rows))
                if carry is not None:
                    chunk = tuple(self._pinned(torch.cat([c, p])) for c, p in zip(carry, chunk))
                full = len(chunk[0]) - len(chunk[0]) % self.batch_size
                for lo in range(0, full, self.batch_size):
                    yield tuple(t[lo : lo + self.batch_size] for t in chunk)
                carry = tuple(t[full:] for t in chunk) if full < len(chunk[0]) else None
            if carry is not None:
                yield carry
