"""The data on the device: a ShardLoader with ``device=`` keeps the rows it reads there and gathers its batches
there, batch for batch the host loader's (the CPU standing in for the device), across epochs, world sizes 1-4, the
evaluation order and an elastic resume; past its budget it falls back to host batches copied over, and says so once.
"""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from spark_mnist.rank.loader import ShardLoader
from spark_mnist.shards.parquet import record_batch

ROWS = 1_003
SHAPE = (28, 28)
TRAIN = dict(shuffle=True, drop_remainder=True)
TEST = dict(shuffle=False, drop_remainder=False)
RESIDENT = dict(device="cpu", device_memory_budget_bytes=2**30)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> list[str]:
    """1,003 random rows in four shards of uneven rows and row groups."""
    root = tmp_path_factory.mktemp("resident")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(ROWS, *SHAPE), dtype=np.uint8)
    labels = rng.integers(0, 10, size=ROWS).astype(np.uint8)
    out = []
    for k, (lo, hi) in enumerate(zip([0, 7, 700, 701], [7, 700, 701, ROWS])):
        path = root / f"part-{k:05d}.parquet"
        pq.write_table(pa.Table.from_batches([record_batch(lo, images[lo:hi], labels[lo:hi])]), path,
                       row_group_size=37)
        out.append(str(path))
    return out


def loaders(paths, world_size: int, batch_size: int, order: dict, **kwargs) -> list[ShardLoader]:
    return [ShardLoader(paths, rank=r, world_size=world_size, batch_size=batch_size, seed=11, **order, **kwargs)
            for r in range(world_size)]


def epoch(loader: ShardLoader) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return list(loader.iter_with_index())


def assert_same_batches(resident: list, host: list) -> None:
    assert len(resident) == len(host) > 0
    for got, want in zip(resident, host):
        assert [t.device.type for t in got] == ["cpu"] * 3
        assert [(t.dtype, t.shape) for t in got] == [(t.dtype, t.shape) for t in want]
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def counting_reads(loader: ShardLoader) -> list[int]:
    """Wraps ``loader._read`` to count its calls (the files opened)."""
    calls, read = [], loader._read
    loader._read = lambda ranges: calls.append(1) or read(ranges)
    return calls


@pytest.mark.parametrize("order", [TRAIN, TEST], ids=["train", "test"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("host_budget", [0, 2**30], ids=["host-streamed", "host-in-memory"])
def test_resident_batches_are_the_host_loaders_for_two_epochs(paths, world_size, order, host_budget):
    host = loaders(paths, world_size, 16, order, memory_budget_bytes=host_budget)
    resident = loaders(paths, world_size, 16, order, **RESIDENT)
    for rank in range(world_size):
        assert resident[rank].resident and not host[rank].resident and host[rank].device is None
        reads = counting_reads(resident[rank])
        for e in range(2):  # each iter() is the next epoch, reshuffled (training order)
            assert_same_batches(epoch(resident[rank]), epoch(host[rank]))
            assert resident[rank].epoch == host[rank].epoch == e
        assert reads == [1], "the rank's rows are read (and put on the device) once, by the first epoch"
        images, labels = next(iter(resident[rank]))  # plain iteration: (images, labels), uint8 and int64
        assert images.dtype == torch.uint8 and images.shape[1:] == (1, *SHAPE) and labels.dtype == torch.int64
    for loader in host + resident:
        loader.close()
    assert resident[0]._cache is None, "close releases the rows on the device"


def test_resume_from_four_ranks_on_two_resident_loaders(paths):
    """A state taken mid-epoch on 4 ranks (batch 8), loaded into 2 resident ranks (batch 16): they yield the host
    loaders' remaining batches, which together are exactly the epoch's samples not yet consumed."""
    four = loaders(paths, 4, 8, TRAIN, **RESIDENT)
    consumed, states = [], []
    for loader in four:
        loader.set_epoch(1)
        it = loader.iter_with_index()
        consumed += [int(i) for _ in range(5) for i in next(it)[0]]
        states.append(loader.state_dict())
        it.close()
    assert all(s == states[0] for s in states) and (states[0]["epoch"], states[0]["step"]) == (1, 5)
    whole_epoch = [int(i) for loader in loaders(paths, 4, 8, TRAIN) for _ in [loader.set_epoch(1)]
                   for index, _, _ in loader.iter_with_index() for i in index]

    host, resident = loaders(paths, 2, 16, TRAIN), loaders(paths, 2, 16, TRAIN, **RESIDENT)
    rest = []
    for h, r in zip(host, resident):
        h.load_state_dict(states[0])
        r.load_state_dict(states[0])
        batches = epoch(r)
        assert_same_batches(batches, epoch(h))
        rest += [int(i) for index, _, _ in batches for i in index]
        assert_same_batches(epoch(r), epoch(h))  # and the next epoch, from step 0
        assert r.epoch == 2
    assert len(rest) == len(set(rest)) and set(rest) == set(whole_epoch) - set(consumed)
    assert sorted(rest + consumed) == sorted(whole_epoch)


def test_past_its_budget_it_falls_back_to_host_batches_and_says_so_once(paths, caplog):
    host = ShardLoader(paths, rank=1, world_size=2, batch_size=16, seed=11)
    with caplog.at_level(logging.WARNING, logger="spark_mnist.rank.loader"):
        loader = ShardLoader(paths, rank=1, world_size=2, batch_size=16, seed=11, device="cpu",
                             device_memory_budget_bytes=1000)
        for _ in range(2):
            assert_same_batches(epoch(loader), epoch(host))
    assert not loader.resident and loader.device == torch.device("cpu")
    assert isinstance(loader._cache[1], np.ndarray), "the rows kept are the host's, none on the device"
    lines = [r.getMessage() for r in caplog.records if r.name == "spark_mnist.rank.loader"]
    assert len(lines) == 1 and "do not fit" in lines[0] and "copied" in lines[0]


def test_the_cpu_budget_defaults_to_the_host_budget(paths):
    rows_bytes = ROWS * (28 * 28 + 16)
    assert ShardLoader(paths, rank=0, world_size=1, batch_size=8, device="cpu").resident
    assert not ShardLoader(paths, rank=0, world_size=1, batch_size=8, device="cpu",
                           memory_budget_bytes=rows_bytes - 1).resident
    assert ShardLoader(paths, rank=0, world_size=1, batch_size=8, device="cpu",
                       memory_budget_bytes=rows_bytes).resident


def test_without_a_device_nothing_changes_and_a_pickled_loader_carries_no_rows(paths):
    loader = ShardLoader(paths, rank=0, world_size=2, batch_size=8, seed=11, **RESIDENT)
    epoch(loader)
    copy = pickle.loads(pickle.dumps(loader))
    assert copy._cache is None and copy.resident and copy.device == torch.device("cpu")
    assert_same_batches(epoch(copy), epoch(loader))
    plain = ShardLoader(paths, rank=0, world_size=2, batch_size=8, seed=11)
    assert plain.device is None and not plain.resident and not plain.pin_memory


def test_the_public_loader_passes_the_device_on(paths, monkeypatch):
    import spark_mnist.torch as smt
    from spark_mnist.rank.world import World

    class Opened:
        image_shape = SHAPE
        manifest = None

        def files(self, split):
            return paths

    monkeypatch.setattr(smt, "open_dataset", lambda dataset: Opened())
    monkeypatch.setattr(smt, "dataset_identity", lambda manifest: "generation:test")
    world = World(1, 3, 1, 3)
    with smt.loader("anywhere", "train", batch_size=8, seed=11, world=world, device="cpu") as loader:
        assert loader.resident and loader.device == torch.device("cpu")
        with ShardLoader(paths, rank=1, world_size=3, batch_size=8, seed=11) as host:
            assert_same_batches(epoch(loader), epoch(host))
    with smt.loader("anywhere", "test", batch_size=8, world=world, device="cpu",
                    device_memory_budget_bytes=0) as loader:
        assert not loader.resident


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("budget", [2**30, 0], ids=["resident", "copied"])
def test_on_a_gpu_the_batches_are_the_host_loaders_on_the_gpu(paths, budget):
    host = ShardLoader(paths, rank=0, world_size=2, batch_size=16, seed=11)
    loader = ShardLoader(paths, rank=0, world_size=2, batch_size=16, seed=11, device="cuda",
                         device_memory_budget_bytes=budget)
    assert loader.resident == bool(budget) and loader.pin_memory == (not budget)
    for _ in range(2):
        got, want = epoch(loader), epoch(host)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert all(t.device.type == "cuda" for t in g)
            assert all(torch.equal(a.cpu(), b) for a, b in zip(g, w))
