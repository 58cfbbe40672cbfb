"""spark_mnist.torch.loader, the public loader API: the world from the environment, exact sharding across ranks,
resume through state_dict, uint8 batches."""

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


def test_a_missing_dataset_names_the_directory(tmp_path):
    from spark_mnist.errors import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="no manifest"):
        smt.loader(tmp_path / "nothing", batch_size=8)
