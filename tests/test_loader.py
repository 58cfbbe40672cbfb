"""The rank-aware loader: exact sharding for world sizes 1-8, equal steps, determinism, resume, streaming."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from spark_mnist.shards.parquet import record_batch
from spark_mnist.rank.loader import ShardLoader, rank_rows, steps_per_epoch
from spark_mnist.shards.parquet import decode_images

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
    options = dict(rank=2, world_size=3, batch_size=8, seed=5, memory_budget_bytes=0 if streaming else 2**30)
    with ShardLoader(paths, **options) as loader:
        loader.set_epoch(1)
        assert loader.state_dict() == {"epoch": 1, "step": 0}
        batches = loader.iter_with_index()
        seen = [next(batches)[0] for _ in range(4)]
        state = loader.state_dict()
        assert state == {"epoch": 1, "step": 4}
        rest = [index for index, _, _ in batches]
        assert loader.state_dict() == {"epoch": 1, "step": loader.steps_total}
    with ShardLoader(paths, **options) as resumed:
        resumed.load_state_dict(state)
        assert len(resumed) == resumed.steps_total - 4
        again = [index for index, _, _ in resumed.iter_with_index()]
    assert len(again) == len(rest) and all(torch.equal(a, b) for a, b in zip(again, rest))
    assert not set(torch.cat(seen).tolist()) & set(torch.cat(again).tolist())
    with pytest.raises(ValueError, match=r"Invalid start_step: 999\. Must be in 0\.\."):
        resumed.load_state_dict({"epoch": 0, "step": 999})
    with pytest.raises(ValueError, match="Invalid loader state"):
        resumed.load_state_dict({"epoch": 0})


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
