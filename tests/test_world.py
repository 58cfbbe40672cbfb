"""Per-rank facts (spark_mnist.rank.world): read once from torchrun's variables, checked against each other."""

from __future__ import annotations

import pytest

from spark_mnist.rank.world import World


def test_a_plain_process_is_rank_0_of_1():
    assert World.from_env({}) == World(rank=0, world_size=1, local_rank=0, local_world_size=1)
    assert World.from_env({}).is_leader


def test_torchrun_variables():
    world = World.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (world.rank, world.world_size, world.local_rank, world.local_world_size) == (3, 4, 1, 2)
    assert not world.is_leader
    # one node: the local world is the whole world
    assert World.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).local_world_size == 2


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert World.from_env() == World(rank=1, world_size=2, local_rank=1, local_world_size=2)


@pytest.mark.parametrize("env, message", [
    ({"RANK": "x"}, r"Invalid RANK: 'x'\. Must be an integer\."),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"Invalid RANK: 2\. Must be in 0\.\.1 \(WORLD_SIZE 2\)\."),
    ({"WORLD_SIZE": "0"}, r"Invalid WORLD_SIZE: 0\. Must be at least 1\."),
    ({"WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, r"Invalid LOCAL_RANK: 2\."),
])
def test_contradictions_are_named(env, message):
    with pytest.raises(ValueError, match=message):
        World.from_env(env)


def test_frozen():
    with pytest.raises(AttributeError):
        World().rank = 1
