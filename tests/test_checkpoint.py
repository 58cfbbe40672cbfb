"""The training checkpoint (spark_mnist.rank.checkpoint): a documented format, loaded weights-only."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

from spark_mnist.errors import InputError
from spark_mnist.models import SimpleCNN
from spark_mnist.rank.checkpoint import CHECKPOINT_NAME, Checkpoint, CheckpointError, load_checkpoint, save_checkpoint


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
    fields = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=1, step=3, world_size=2,
                  batch_size=32, seed=1)
    return Checkpoint(**{**fields, **changes})


def test_round_trip(tmp_path):
    saved = a_checkpoint()
    save_checkpoint(saved, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no temporary file left
    loaded = load_checkpoint(str(tmp_path), world_size=2, batch_size=32)
    assert (loaded.epoch, loaded.step, loaded.world_size, loaded.batch_size, loaded.seed) == (1, 3, 2, 32, 1)
    assert loaded.loader_state() == {"epoch": 1, "step": 3}
    assert all(torch.equal(loaded.model[k], v) for k, v in saved.model.items())
    model = SimpleCNN(10)
    model.load_state_dict(loaded.model)
    torch.optim.Adam(model.parameters(), lr=1e-3).load_state_dict(loaded.optimizer)
    assert load_checkpoint(str(tmp_path / "elsewhere"), world_size=2, batch_size=32) is None


def test_another_world_size_or_batch_size_is_refused(tmp_path):
    save_checkpoint(a_checkpoint(), str(tmp_path))
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: written with world size 2 and batch size 32; this "
                                              r"run has 4 and 32"):
        load_checkpoint(str(tmp_path), world_size=4, batch_size=32)


class Planted:
    """An object whose unpickling calls a function: here it only makes a directory, a planted one could do anything."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / CHECKPOINT_NAME
    torch.save({**a_checkpoint().to_dict(), "extra": Planted(marker)}, path)
    with pytest.raises(CheckpointError, match=rf"{path}: refused or unreadable as a weights-only checkpoint, "
                                              r"nothing in it was run") as raised:
        load_checkpoint(str(tmp_path), world_size=2, batch_size=32)
    assert isinstance(raised.value, InputError)
    assert not marker.exists()  # the callable never ran
    torch.load(path, weights_only=False)  # what loading used to do: the planted call runs
    assert marker.exists()


def test_garbage_and_foreign_files_are_named(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=rf"{path}: refused or unreadable"):
        load_checkpoint(str(tmp_path), world_size=2, batch_size=32)
    torch.save({"model": {}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=rf"{path}: not a training checkpoint: expected the entries"):
        load_checkpoint(str(tmp_path), world_size=2, batch_size=32)
