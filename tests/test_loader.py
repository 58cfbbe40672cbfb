"""The rank-aware loader: exact sharding for world sizes 1-8, equal steps, determinism, resume, streaming."""

from __future__ import annotations

import contextlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from spark_mnist.rank.loader import ShardLoader
from spark_mnist.rank.order import rank_rows, steps_per_epoch
from spark_mnist.shards.parquet import decode_images, record_batch

ROWS = 1_003  # prime-ish, so no world size or batch size divides it


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same rows in three shard/row-group layouts: even, uneven, and one file with tiny row groups."""
    root = tmp_path_factory.mktemp("layouts")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(ROWS, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=ROWS).astype(np.uint8)
    cuts = {"even": ([0, 251, 502, 753, ROWS], 100), "uneven": ([0, 7, 700, 701, ROWS], 37),
            "single": ([0, ROWS], 9)}
    out = {}
    for name, (bounds, row_group) in cuts.items():
        paths = []
        for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            path = root / name / f"part-{k:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            table = pa.Table.from_batches([record_batch(lo, images[lo:hi], labels[lo:hi])])
            pq.write_table(table, path, row_group_size=row_group)
            paths.append(str(path))
        out[name] = paths[::-1]  # order given must not matter
    return out, images, labels


def collect(paths, world_size, batch_size, epoch=0, **kwargs):
    per_rank = []
    for rank in range(world_size):
        with ShardLoader(paths, rank=rank, world_size=world_size, batch_size=batch_size, seed=7, **kwargs) as loader:
            loader.set_epoch(epoch)
            batches = list(loader.iter_with_index())
            assert len(batches) == len(loader)
            per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize("layout", ["even", "uneven", "single"])
@pytest.mark.parametrize("world_size", range(1, 9))
@pytest.mark.parametrize("streaming", [False, True])
def test_every_rank_same_steps_and_each_row_once(layouts, layout, world_size, streaming):
    paths, images, labels = layouts
    batch_size = 16
    budget = 0 if streaming else 2**30
    per_rank = collect(paths[layout], world_size, batch_size, memory_budget_bytes=budget)
    steps = steps_per_epoch(ROWS, world_size, batch_size)
    assert [len(b) for b in per_rank] == [steps] * world_size
    seen = torch.cat([index for batches in per_rank for index, _, _ in batches]).numpy()
    assert len(seen) == len(np.unique(seen)) == steps * batch_size * world_size
    assert ROWS - len(seen) < world_size * batch_size  # the documented, dropped remainder
    for batches in per_rank:
        for index, x, y in batches:
            assert x.dtype == torch.uint8 and x.shape == (batch_size, 1, 28, 28)
            assert y.dtype == torch.int64 and y.shape == (batch_size,)
            assert torch.equal(x[:, 0], torch.from_numpy(images[index.numpy()]))
            assert torch.equal(y, torch.from_numpy(labels[index.numpy()].astype(np.int64)))


@pytest.mark.parametrize("world_size", [1, 3, 8])
def test_evaluation_yields_every_row_once(layouts, world_size):
    paths, _, _ = layouts
    per_rank = collect(paths["uneven"], world_size, 64, shuffle=False, drop_remainder=False)
    seen = torch.cat([index for batches in per_rank for index, _, _ in batches]).numpy()
    assert np.array_equal(seen, np.arange(ROWS))


@pytest.mark.parametrize("streaming", [False, True])
def test_order_reproducible_reshuffled_and_thread_independent(layouts, streaming):
    paths = layouts[0]["uneven"]
    budget = 0 if streaming else 2**30

    def order(epoch, threads):
        batches = collect(paths, 2, 16, epoch=epoch, memory_budget_bytes=budget, reader_threads=threads)
        return torch.cat([i for b in batches for i, _, _ in b]).tolist()

    assert order(0, 1) == order(0, 4) == order(0, 2)
    assert order(1, 2) != order(0, 2)
    assert sorted(order(0, 2)) != order(0, 2)


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_sees_exactly_the_unseen_samples(layouts, streaming):
    paths = layouts[0]["uneven"]
    budget = 0 if streaming else 2**30
    with ShardLoader(paths, rank=1, world_size=3, batch_size=8, seed=3, memory_budget_bytes=budget) as loader:
        loader.set_epoch(2)
        full = [i for i, _, _ in loader.iter_with_index()]
        loader.set_epoch(2, start_step=5)
        tail = [i for i, _, _ in loader.iter_with_index()]
    assert len(tail) == len(full) - 5
    assert all(torch.equal(a, b) for a, b in zip(full[5:], tail))


def test_rank_rows_balanced_and_validated():
    ranges = [rank_rows(10, r, 4) for r in range(4)]
    assert ranges == [(0, 2), (2, 5), (5, 7), (7, 10)]
    with pytest.raises(ValueError, match="rank"):
        rank_rows(10, 4, 4)


def test_decode_images_rejects_wrong_row_size():
    from spark_mnist.errors import DatasetMismatchError

    column = pa.array([b"\x00" * 784, b"\x01" * 783], type=pa.binary())
    with pytest.raises(DatasetMismatchError, match="784"):
        decode_images(column, 784, "f.parquet")
    good = pa.array([bytes([i]) * 784 for i in range(5)], type=pa.binary()).slice(1, 3)
    assert decode_images(good, 784)[:, 0].tolist() == [1, 2, 3]


def test_prefetched_keeps_order_and_stops_early():
    from spark_mnist.rank.loader import prefetched

    calls = []

    def square(x):
        calls.append(x)
        return x * x

    assert list(prefetched(square, range(5))) == [0, 1, 4, 9, 16]
    calls.clear()
    results = prefetched(square, range(100))
    assert [next(results), next(results)] == [0, 1]
    results.close()  # waits for the one in flight, starts no more
    assert calls == [0, 1, 2]
    assert list(prefetched(square, [])) == []


def prefetch_threads(before: frozenset = frozenset()) -> set:
    """The loaders' background decoding threads alive now, other than those in ``before``."""
    import threading

    return {t for t in threading.enumerate() if t.name.startswith("shard-prefetch")} - before


@pytest.mark.parametrize("streaming", [False, True])
def test_state_dict_resumes_exactly_where_iteration_stopped(layouts, streaming):
    paths = layouts[0]["uneven"]
    options = dict(rank=2, world_size=3, batch_size=8, seed=5, memory_budget_bytes=0 if streaming else 2**30,
                   dataset="generation:7")
    with ShardLoader(paths, **options) as loader:
        loader.set_epoch(1)
        assert loader.state_dict() == {"seed": 5, "epoch": 1, "step": 0, "samples": 0, "world_size": 3,
                                       "batch_size": 8, "global_batch_size": 24, "rows": ROWS, "shuffle": True,
                                       "drop_remainder": True, "dataset": "generation:7"}
        batches = loader.iter_with_index()
        seen = [next(batches)[0] for _ in range(4)]
        state = loader.state_dict()
        assert (state["epoch"], state["step"], state["samples"]) == (1, 4, 4 * 24)
        rest = [index for index, _, _ in batches]
        assert loader.state_dict()["step"] == loader.steps_total
    with ShardLoader(paths, **options) as resumed:
        resumed.load_state_dict(state)
        assert len(resumed) == resumed.steps_total - 4
        again = [index for index, _, _ in resumed.iter_with_index()]
    assert len(again) == len(rest) and all(torch.equal(a, b) for a, b in zip(again, rest))
    assert not set(torch.cat(seen).tolist()) & set(torch.cat(again).tolist())
    with pytest.raises(ValueError, match=r"Invalid start_step: 999\. Must be in 0\.\."):
        resumed.load_state_dict({**state, "samples": 999 * 24})
    with pytest.raises(ValueError, match=r"Invalid samples: 25\. Must be a multiple of the samples per step 24"):
        resumed.load_state_dict({**state, "samples": 25})
    with pytest.raises(ValueError, match="Invalid loader state"):
        resumed.load_state_dict({"epoch": 0, "step": 0})


@pytest.mark.parametrize(("change", "message"), [
    ({"seed": 0}, r"Cannot resume: the seed is 0 in ckpt, 5 in this run\.$"),
    ({"dataset": "generation:1"}, r"Cannot resume: the dataset is 'generation:1' in ckpt, 'generation:7' in this run"),
    ({"rows": 1000}, r"Cannot resume: the split's rows is 1000 in ckpt, 1003 in this run"),
    ({"global_batch_size": 32}, r"Cannot resume: the global batch size is 32 in ckpt, 24 in this run \(batch size 8 "
                                r"x 3 ranks\)\.$"),
])
def test_a_state_it_cannot_honour_is_refused_in_one_line(layouts, change, message):
    from spark_mnist.errors import InputError, LoaderStateError

    with ShardLoader(layouts[0]["even"], rank=0, world_size=3, batch_size=8, seed=5, dataset="generation:7") as loader:
        state = {**loader.state_dict(), **change}
        with pytest.raises(LoaderStateError, match=message) as raised:
            loader.load_state_dict(state, source="ckpt")
    assert isinstance(raised.value, InputError) and "\n" not in str(raised.value)


def test_no_dataset_identity_on_either_side_is_not_checked(layouts):
    with ShardLoader(layouts[0]["even"], rank=0, world_size=1, batch_size=8) as loader:
        loader.load_state_dict({**loader.state_dict(), "dataset": "generation:1", "samples": 16})
        assert loader.start_step == 2


def test_evaluation_order_does_not_resume_on_another_world_size(layouts):
    from spark_mnist.errors import LoaderStateError

    options = dict(batch_size=8, shuffle=False, drop_remainder=False)
    with ShardLoader(layouts[0]["even"], rank=0, world_size=2, **options) as loader:
        state = loader.state_dict()
    with ShardLoader(layouts[0]["even"], rank=0, world_size=4, batch_size=4, shuffle=False,
                     drop_remainder=False) as other:
        with pytest.raises(LoaderStateError, match="the world size is 2 in the saved state, 4 in this run"):
            other.load_state_dict(state)


@pytest.mark.parametrize("layout", ["even", "uneven", "single"])
def test_order_is_the_same_streamed_or_in_memory(layouts, layout):
    paths = layouts[0][layout]
    orders = [[torch.cat([i for i, _, _ in b]).tolist() for b in collect(paths, 3, 8, epoch=2,
                                                                          memory_budget_bytes=budget)]
              for budget in (0, 2**30)]
    assert orders[0] == orders[1]


def test_close_stops_and_joins_the_prefetch_thread(layouts):
    paths = layouts[0]["single"]  # tiny row groups: many windows, so the prefetch thread has work left
    before = frozenset(prefetch_threads())
    loader = ShardLoader(paths, rank=0, world_size=1, batch_size=4, memory_budget_bytes=0)
    batches = iter(loader)
    next(batches)
    assert prefetch_threads(before)  # decoding the next window in the background
    loader.close()
    assert not prefetch_threads(before)  # joined before close returned, not left to garbage collection
    assert list(batches) == []  # the closed iteration yields nothing more
    loader.close()  # idempotent


def test_leaving_the_context_closes_open_iterations(layouts):
    paths = layouts[0]["single"]
    before = frozenset(prefetch_threads())
    with ShardLoader(paths, rank=0, world_size=1, batch_size=4, memory_budget_bytes=0) as loader:
        first, second = loader.iter_with_index(), iter(loader)
        next(first), next(second)
        assert len(prefetch_threads(before)) == 2
    assert not prefetch_threads(before)
    assert list(first) == [] and list(second) == []


# ------------------------------------------------------------------ elastic resume: N ranks -> M ranks, exactly once

ELASTIC_ROWS = 70_001  # two windows (65,536 + 4,465 rows), and no global batch below divides it
ELASTIC_SHAPE = (2, 2)  # tiny images: many rows, few bytes
GLOBAL_BATCH = 48  # divisible by 1, 2, 3 and 4


@pytest.fixture(scope="module")
def elastic_paths(tmp_path_factory):
    """ELASTIC_ROWS rows written by the shard writer into three files of uneven rows and uneven row groups."""
    from spark_mnist.shards.parquet import write_rows

    root = tmp_path_factory.mktemp("elastic")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(ELASTIC_ROWS, *ELASTIC_SHAPE), dtype=np.uint8)
    labels = rng.integers(0, 10, size=ELASTIC_ROWS).astype(np.uint8)
    bounds, groups = [0, 20_000, 53_333, ELASTIC_ROWS], [3_000, 7_777, 1_234]
    paths = []
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        path = root / f"part-{k:05d}.parquet"
        write_rows(str(path), lo, images[lo:hi], labels[lo:hi], groups[k])
        paths.append(str(path))
    return paths


def elastic_loader(paths, rank, world_size, streaming):
    return ShardLoader(paths, rank=rank, world_size=world_size, batch_size=GLOBAL_BATCH // world_size, seed=11,
                       image_shape=ELASTIC_SHAPE, memory_budget_bytes=0 if streaming else 2**30)


def global_batches(paths, world_size, streaming, epoch, state=None, steps=None):
    """The global batches of ``world_size`` ranks from ``state`` (or the epoch's start): per step, the ranks'
    sample indices in rank order; each rank stops after ``steps`` steps.  Returns (batches, the state after)."""
    per_rank, after = [], None
    for rank in range(world_size):
        with elastic_loader(paths, rank, world_size, streaming) as loader:
            loader.set_epoch(epoch)
            if state is not None:
                loader.load_state_dict(state)
            iterator = loader.iter_with_index()
            per_rank.append([next(iterator)[0] for _ in range(steps)] if steps is not None
                            else [index for index, _, _ in iterator])
            after = loader.state_dict() if rank == 0 else after
    assert len({len(batches) for batches in per_rank}) == 1  # every rank the same steps: split evenly
    for batches in per_rank:
        assert all(len(b) == GLOBAL_BATCH // world_size for b in batches)
    return [torch.cat(parts).tolist() for parts in zip(*per_rank)], after


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(("before", "after"), [(4, 2), (2, 3), (3, 1), (1, 4)])
def test_elastic_resume_covers_the_rest_of_the_epoch_exactly_once(elastic_paths, before, after, streaming):
    steps = ELASTIC_ROWS // GLOBAL_BATCH
    stop = 1_000  # mid-epoch, and in the first window
    uninterrupted, _ = global_batches(elastic_paths, before, streaming, epoch=1)
    assert len(uninterrupted) == steps
    done, state = global_batches(elastic_paths, before, streaming, epoch=1, steps=stop)
    assert state["samples"] == stop * GLOBAL_BATCH and state["world_size"] == before
    rest, _ = global_batches(elastic_paths, after, streaming, epoch=0, state=state)
    seen = [i for batch in done for i in batch]
    unseen = [i for batch in rest for i in batch]
    assert len(rest) == steps - stop
    assert len(set(seen)) == len(seen) and len(set(unseen)) == len(unseen) and not set(seen) & set(unseen)
    assert sorted(seen + unseen) == sorted(i for batch in uninterrupted for i in batch)  # exactly once
    assert len(seen) + len(unseen) == ELASTIC_ROWS - ELASTIC_ROWS % GLOBAL_BATCH  # only the tail is dropped
    assert done + rest == uninterrupted  # and the very global batches, in order, whatever the world size
    later, _ = global_batches(elastic_paths, after, streaming, epoch=2)
    again, _ = global_batches(elastic_paths, before, streaming, epoch=2)
    assert later == again and later != uninterrupted


def test_the_order_is_pinned_so_a_checkpoint_resumes_on_another_runtime():
    """The same (rows, seed, epoch) gives the same sequence on every numpy the runtimes ship (1.23 to 2.x): a
    checkpoint written on one Databricks runtime resumes on another.  A change here breaks every saved position."""
    from spark_mnist.rank.order import BLOCK_ROWS, WINDOW_BLOCKS, epoch_windows

    assert (BLOCK_ROWS, WINDOW_BLOCKS) == (8_192, 8)
    windows = epoch_windows(20_000, seed=5, epoch=3)
    assert [w.ranges for w in windows] == [((0, 20_000),)]
    assert windows[0].order[:8].tolist() == [17555, 10177, 3433, 15155, 3389, 16606, 18902, 12099]
    assert np.array_equal(np.sort(windows[0].order), np.arange(20_000))
    assert [w.order.tolist() for w in epoch_windows(10, seed=5, epoch=3, shuffle=False)] == [list(range(10))]


# ------------------------------------------------------------------ epochs: every iter() the next one, as a DataLoader

def epoch_order(loader, epoch=None) -> list[int]:
    """The sample indices of one iteration of ``loader`` (after ``set_epoch(epoch)`` when given)."""
    if epoch is not None:
        loader.set_epoch(epoch)
    return [int(i) for index, _, _ in loader.iter_with_index() for i in index]


@pytest.mark.parametrize("streaming", [False, True])
def test_each_iteration_is_the_next_epoch_in_set_epochs_order(layouts, streaming):
    options = dict(rank=1, world_size=2, batch_size=16, seed=7, memory_budget_bytes=0 if streaming else 2**30)
    with ShardLoader(layouts[0]["uneven"], **options) as plain, ShardLoader(layouts[0]["uneven"], **options) as again:
        orders = [epoch_order(plain) for _ in range(3)]
        assert plain.epoch == 2 and plain.state_dict()["step"] == plain.steps_total
        assert [epoch_order(again) for _ in range(3)] == orders  # deterministic
    with ShardLoader(layouts[0]["uneven"], **options) as chosen:
        assert [epoch_order(chosen, k) for k in range(3)] == orders  # epoch k's order is set_epoch(k)'s
    assert orders[0] != orders[1] != orders[2] != orders[0]
    assert all(len(order) == steps_per_epoch(ROWS, 2, 16) * 16 for order in orders)


def test_plain_iteration_advances_the_epoch_of_iter_too(layouts):
    with ShardLoader(layouts[0]["even"], rank=0, world_size=1, batch_size=32, seed=7) as loader:
        first = [index for index, _, _ in loader.iter_with_index()]
        second = [index.clone() for index, _, _ in loader.iter_with_index()]
        third = [labels for _, labels in loader]  # __iter__ and iter_with_index share the epoch count
        assert loader.epoch == 2 and len(third) == len(first) == len(second)
    with ShardLoader(layouts[0]["even"], rank=0, world_size=1, batch_size=32, seed=7) as reference:
        assert epoch_order(reference, 1) == torch.cat(second).tolist() != torch.cat(first).tolist()


def test_an_explicit_set_epoch_wins_then_counting_goes_on_from_it(layouts):
    paths = layouts[0]["uneven"]
    with ShardLoader(paths, rank=0, world_size=3, batch_size=8, seed=2) as loader, \
            ShardLoader(paths, rank=0, world_size=3, batch_size=8, seed=2) as reference:
        epoch_order(loader)  # epoch 0
        loader.set_epoch(5)
        assert epoch_order(loader) == epoch_order(reference, 5)
        assert epoch_order(loader) == epoch_order(reference, 6) and loader.epoch == 6
        loader.set_epoch(1)
        loader.set_epoch(3)  # the last one set wins
        assert epoch_order(loader) == epoch_order(reference, 3)


def test_an_epoch_left_early_is_not_repeated(layouts):
    with ShardLoader(layouts[0]["even"], rank=0, world_size=1, batch_size=16, seed=4) as loader:
        with contextlib.closing(loader.iter_with_index()) as batches:
            next(batches)
        assert epoch_order(loader) == epoch_order(ShardLoader(layouts[0]["even"], rank=0, world_size=1,
                                                              batch_size=16, seed=4), 1)


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_then_plain_iteration_gives_the_rest_then_the_next_epoch(layouts, streaming):
    paths = layouts[0]["uneven"]
    options = dict(rank=1, world_size=2, batch_size=8, seed=9, memory_budget_bytes=0 if streaming else 2**30)
    with ShardLoader(paths, **options) as first:
        epoch_order(first)  # epoch 0, plainly
        with contextlib.closing(first.iter_with_index()) as batches:  # epoch 1, stopped after 5 steps
            head = [int(i) for _ in range(5) for i in next(batches)[0]]
            state = first.state_dict()
    assert (state["epoch"], state["step"]) == (1, 5)
    with ShardLoader(paths, **options) as resumed, ShardLoader(paths, **options) as reference:
        resumed.load_state_dict(state)
        assert len(resumed) == resumed.steps_total - 5
        rest = epoch_order(resumed)
        assert len(resumed) == resumed.steps_total  # the next iter() is a whole epoch
        after = epoch_order(resumed)
        assert head + rest == epoch_order(reference, 1)
        assert after == epoch_order(reference, 2) and resumed.epoch == 2


def test_a_state_saved_at_an_epochs_end_resumes_with_an_empty_rest(layouts):
    options = dict(rank=0, world_size=1, batch_size=16, seed=1)
    with ShardLoader(layouts[0]["even"], **options) as first:
        epoch_order(first)
        state = first.state_dict()
    with ShardLoader(layouts[0]["even"], **options) as resumed:
        resumed.load_state_dict(state)
        assert len(resumed) == 0 and epoch_order(resumed) == []
        assert epoch_order(resumed) == epoch_order(ShardLoader(layouts[0]["even"], **options), 1)


def test_train_workers_pattern_set_epoch_every_epoch_is_unchanged(layouts):
    """rank/train.py: set_epoch(epoch, start_step) (or load_state_dict), one iteration, set_epoch(epoch + 1)."""
    options = dict(rank=0, world_size=2, batch_size=8, seed=3)
    with ShardLoader(layouts[0]["even"], **options) as loader, \
            ShardLoader(layouts[0]["even"], **options) as reference:
        loader.set_epoch(1, start_step=2)
        seen = []
        while loader.epoch < 4:
            epoch = loader.epoch
            seen.append(epoch_order(loader))
            assert loader.state_dict(epoch=epoch, step=3)["samples"] == 3 * 16
            loader.set_epoch(epoch + 1)
            assert loader.state_dict()["epoch"] == epoch + 1 and loader.state_dict()["step"] == 0
        assert seen[0] == epoch_order(reference, 1)[2 * 8:]
        assert seen[1:] == [epoch_order(reference, k) for k in (2, 3)]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_dataloader_of_batch_size_none_gives_the_same_batches(layouts, streaming):
    from torch.utils.data import DataLoader, IterableDataset

    options = dict(rank=2, world_size=3, batch_size=8, seed=6, memory_budget_bytes=0 if streaming else 2**30)
    with ShardLoader(layouts[0]["uneven"], **options) as loader, \
            ShardLoader(layouts[0]["uneven"], **options) as reference:
        assert isinstance(loader, IterableDataset)
        wrapped = DataLoader(loader, batch_size=None)
        assert len(wrapped) == len(loader) == loader.steps_total
        for _ in range(2):  # each pass over the DataLoader is the loader's next epoch
            got, expected = list(wrapped), list(reference)
            assert len(got) == len(expected) == loader.steps_total
            for (images, labels), (x, y) in zip(got, expected):
                assert images.dtype == torch.uint8 and images.shape == (8, 1, 28, 28)
                assert torch.equal(images, x) and torch.equal(labels, y)
        assert loader.epoch == reference.epoch == 1


def test_dataloader_workers_are_refused_in_one_clear_error(layouts):
    from torch.utils.data import DataLoader

    from spark_mnist.errors import InputError

    with ShardLoader(layouts[0]["even"], rank=0, world_size=1, batch_size=64) as loader:
        with pytest.raises(InputError, match=r"Invalid DataLoader num_workers: 1\. Must be 0 for a spark_mnist "
                                             r"loader \(DataLoader\(loader, batch_size=None\)\)"):
            next(iter(DataLoader(loader, batch_size=None, num_workers=1)))


def test_a_pickled_loader_keeps_its_settings_and_position_not_its_iterations(layouts):
    import pickle

    with ShardLoader(layouts[0]["even"], rank=1, world_size=2, batch_size=16, seed=8) as loader:
        batches = loader.iter_with_index()
        next(batches)  # an open iteration and decoded rows: neither travels
        loader.set_epoch(3, start_step=2)
        copy = pickle.loads(pickle.dumps(loader))
        assert copy._cache is None and len(copy._iterators) == 0
        assert epoch_order(copy) == epoch_order(loader) and copy.epoch == 3
        batches.close()
