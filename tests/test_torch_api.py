"""spark_mnist.torch.loader, the public loader API: the world from the environment, exact sharding across ranks,
resume through state_dict, uint8 batches, a new epoch every iteration, a DataLoader around it."""

from __future__ import annotations

import pytest
import torch

import spark_mnist.torch as smt
from spark_mnist.rank.world import World


@pytest.fixture(scope="module")
def dataset(spark, tmp_path_factory):
    from tests.test_launch import ingested

    return str(ingested(spark, tmp_path_factory.mktemp("torch_api"), 203, 57, 3))


def indices(loader) -> list[int]:
    return [int(i) for index, _, _ in loader.iter_with_index() for i in index]


def test_world_comes_from_torchruns_environment(dataset, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with smt.loader(dataset, "train", batch_size=16, seed=3) as loader:
        assert (loader.rank, loader.world_size) == (1, 2)
        images, labels = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (16, 1, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (16,)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_exact_sharding(dataset, world_size):
    train = [smt.loader(dataset, "train", batch_size=8, seed=1, world=World(r, world_size, r, world_size))
             for r in range(world_size)]
    seen = [indices(loader) for loader in train]
    steps = (203 // world_size) // 8
    assert all(len(s) == steps * 8 for s in seen), "equal full steps on every rank"
    flat = [i for s in seen for i in s]
    assert len(flat) == len(set(flat)), "no sample twice in an epoch"
    test = [smt.loader(dataset, "test", batch_size=8, world=World(r, world_size, r, world_size))
            for r in range(world_size)]
    assert sorted(i for loader in test for i in indices(loader)) == list(range(57)), "every test row once"


def test_state_dict_resumes_with_the_unseen_samples(dataset):
    world = World(0, 1, 0, 1)
    full = indices(smt.loader(dataset, "train", batch_size=8, seed=5, world=world))
    first = smt.loader(dataset, "train", batch_size=8, seed=5, world=world)
    it = first.iter_with_index()
    head = [int(i) for _ in range(4) for i in next(it)[0]]
    state = first.state_dict()
    it.close()
    resumed = smt.loader(dataset, "train", batch_size=8, seed=5, world=world)
    resumed.load_state_dict(state)
    assert head + indices(resumed) == full


def test_a_plain_loop_reads_a_new_epoch_each_time_and_set_epoch_still_wins(dataset):
    world = World(0, 1, 0, 1)
    with smt.loader(dataset, "train", batch_size=8, seed=5, world=world) as loader:
        orders = [indices(loader) for _ in range(3)]  # for epoch in range(3): for batch in loader: ...
        assert len({tuple(o) for o in orders}) == 3 and all(len(set(o)) == len(o) == 200 for o in orders)
        loader.set_epoch(1)
        assert indices(loader) == orders[1] and indices(loader) == orders[2]
    with smt.loader(dataset, "train", batch_size=8, seed=5, world=world) as again:
        again.set_epoch(2)
        assert indices(again) == orders[2]


def test_resume_then_a_plain_loop_finishes_the_epoch_then_goes_on(dataset):
    world = World(0, 1, 0, 1)
    with smt.loader(dataset, "train", batch_size=8, seed=5, world=world) as reference:
        epochs = [indices(reference) for _ in range(2)]
    with smt.loader(dataset, "train", batch_size=8, seed=5, world=world) as first:
        batches = first.iter_with_index()
        head = [int(i) for _ in range(3) for i in next(batches)[0]]
        state = first.state_dict()
        batches.close()
    with smt.loader(dataset, "train", batch_size=8, seed=5, world=world) as resumed:
        resumed.load_state_dict(state)
        assert [head + indices(resumed), indices(resumed)] == epochs


def test_a_dataloader_around_the_loader_yields_the_same_batches(dataset):
    from torch.utils.data import DataLoader

    with smt.loader(dataset, "test", batch_size=16) as loader, smt.loader(dataset, "test", batch_size=16) as plain:
        wrapped = list(DataLoader(loader, batch_size=None))
        expected = list(plain)
    assert len(wrapped) == len(expected) == 4  # 57 rows: 3 full batches and a short one
    assert all(torch.equal(a, x) and torch.equal(b, y) for (a, b), (x, y) in zip(wrapped, expected))


def test_a_missing_dataset_names_the_directory(tmp_path):
    from spark_mnist.errors import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="no manifest"):
        smt.loader(tmp_path / "nothing", batch_size=8)
