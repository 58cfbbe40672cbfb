"""The training checkpoint (spark_mnist.rank.checkpoint): a documented format that describes itself, loaded
weights-only; a resume it cannot honour is refused in one line."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

from spark_mnist.errors import InputError, LoaderStateError
from spark_mnist.models import SimpleCNN
from spark_mnist.rank.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from spark_mnist.rank.loader import ShardLoader
from spark_mnist.runs import CHECKPOINT_NAME


@pytest.fixture(autouse=True)
def inductor_cache_dir(tmp_path_factory, monkeypatch):
    """torch's compiler, which the optimizer's first step may import, sets this variable when it is unset."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))


def a_checkpoint(**changes) -> Checkpoint:
    torch.manual_seed(0)
    model = SimpleCNN(10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.zeros(2, 1, 28, 28)).sum().backward()
    optimizer.step()  # an optimizer state with tensors, as training saves it
    loader = {"seed": 1, "epoch": 1, "step": 3, "samples": 3 * 64, "world_size": 2, "batch_size": 32,
              "global_batch_size": 64, "rows": ROWS, "shuffle": True, "drop_remainder": True,
              "dataset": "generation:g1"}
    return Checkpoint(model=model.state_dict(), optimizer=optimizer.state_dict(), loader={**loader, **changes})


ROWS = 1_000


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """ROWS rows in two shard files, written by the shard writer."""
    import numpy as np

    from spark_mnist.shards.parquet import write_rows

    root = tmp_path_factory.mktemp("shards")
    images = np.zeros((ROWS, 28, 28), dtype=np.uint8)
    labels = np.zeros(ROWS, dtype=np.uint8)
    paths = [str(root / "part-00000.parquet"), str(root / "part-00001.parquet")]
    write_rows(paths[0], 0, images[:600], labels[:600], 256)
    write_rows(paths[1], 600, images[600:], labels[600:], 256)
    return paths


def loader_for(paths, world_size=2, batch_size=32, seed=1, dataset="generation:g1", rank=0) -> ShardLoader:
    return ShardLoader(paths, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed, dataset=dataset)


def test_round_trip(tmp_path, shards):
    saved = a_checkpoint()
    save_checkpoint(saved, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no temporary file left
    loaded = load_checkpoint(str(tmp_path))
    assert loaded.source == str(tmp_path / CHECKPOINT_NAME) and loaded.loader == saved.loader
    assert (loaded.loader["epoch"], loaded.loader["step"]) == (1, 3)
    assert all(torch.equal(loaded.model[k], v) for k, v in saved.model.items())
    model = SimpleCNN(10)
    model.load_state_dict(loaded.model)
    torch.optim.Adam(model.parameters(), lr=1e-3).load_state_dict(loaded.optimizer)
    with loader_for(shards) as loader:
        loader.load_state_dict(loaded.loader, source=loaded.source)
        assert (loader.epoch, loader.start_step) == (1, 3)
    assert load_checkpoint(str(tmp_path / "elsewhere")) is None


def test_a_checkpoint_describes_what_decides_the_order(tmp_path, shards):
    """What a training loader's state_dict holds goes into the checkpoint whole."""
    with loader_for(shards, dataset="sha256:abc") as loader:
        loader.set_epoch(2, 5)
        state = loader.state_dict()
    save_checkpoint(a_checkpoint(**state), str(tmp_path))
    loader_state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["loader"]
    assert loader_state == {"seed": 1, "epoch": 2, "step": 5, "samples": 5 * 64, "world_size": 2, "batch_size": 32,
                            "global_batch_size": 64, "rows": ROWS, "shuffle": True, "drop_remainder": True,
                            "dataset": "sha256:abc"}


@pytest.mark.parametrize(("new", "message"), [
    (dict(seed=7), r"the seed is 1 in {path}, 7 in this run\.$"),
    (dict(dataset="generation:g2"), r"the dataset is 'generation:g1' in {path}, 'generation:g2' in this run\.$"),
    (dict(batch_size=64), r"the global batch size is 64 in {path}, 128 in this run \(batch size 64 x 2 ranks\)\.$"),
])
def test_resume_refuses_what_it_cannot_honour_in_one_line(tmp_path, shards, new, message):
    save_checkpoint(a_checkpoint(), str(tmp_path))
    checkpoint = load_checkpoint(str(tmp_path))
    with loader_for(shards, **new) as loader:
        with pytest.raises(LoaderStateError, match="^Cannot resume: " + message.format(path=checkpoint.source)) as e:
            loader.load_state_dict(checkpoint.loader, source=checkpoint.source)
    assert isinstance(e.value, InputError) and "\n" not in str(e.value)


def test_another_world_size_holds_the_global_batch(tmp_path, shards):
    save_checkpoint(a_checkpoint(), str(tmp_path))  # 2 ranks x 32: global batch 64
    checkpoint = load_checkpoint(str(tmp_path))
    assert [checkpoint.batch_size_for(m) for m in (1, 2, 4, 8)] == [64, 32, 16, 8]
    assert a_checkpoint(global_batch_size=96).batch_size_for(3) == 32
    with pytest.raises(LoaderStateError, match=rf"^Cannot resume: the global batch size 64 of {checkpoint.source} does "
                                               r"not split over 3 ranks; resume on one of 1, 2, 4, 8 ranks\.$"):
        checkpoint.batch_size_for(3)
    with loader_for(shards, world_size=4, batch_size=16, rank=3) as loader:
        loader.load_state_dict(checkpoint.loader, source=checkpoint.source)
        assert (loader.epoch, loader.start_step) == (1, 3)  # 3 global batches consumed, on any world size


class Planted:
    """An object whose unpickling calls a function: here it only makes a directory, a planted one could do anything."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / CHECKPOINT_NAME
    checkpoint = a_checkpoint()
    saved = {"model": checkpoint.model, "optimizer": checkpoint.optimizer, "loader": checkpoint.loader}
    torch.save({**saved, "extra": Planted(marker)}, path)
    with pytest.raises(CheckpointError, match=rf"{path}: refused or unreadable as a weights-only checkpoint, "
                                              r"nothing in it was run") as raised:
        load_checkpoint(str(tmp_path))
    assert isinstance(raised.value, InputError)
    assert not marker.exists()  # the callable never ran
    torch.load(path, weights_only=False)  # what loading used to do: the planted call runs
    assert marker.exists()


def test_garbage_and_foreign_files_are_named(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=rf"{path}: refused or unreadable"):
        load_checkpoint(str(tmp_path))
    torch.save({"model": {}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=rf"{path}: not a training checkpoint: expected the entries"):
        load_checkpoint(str(tmp_path))
    # the format of before the loader state: epoch and step, no seed, rows or dataset to check a resume against
    torch.save({"model": {}, "optimizer": {}, "epoch": 1, "step": 3, "world_size": 2, "batch_size": 32, "seed": 0},
               path)
    with pytest.raises(CheckpointError, match=rf"{path}: not a training checkpoint: expected the entries \['model', "
                                              r"'optimizer', 'loader'\]"):
        load_checkpoint(str(tmp_path))
    torch.save({"model": {}, "optimizer": {}, "loader": {"epoch": 1, "step": 3}}, path)
    with pytest.raises(CheckpointError, match=rf"{path}: its loader state lacks entries"):
        load_checkpoint(str(tmp_path))
