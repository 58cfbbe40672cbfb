"""The commit's lease on local disk (:mod:`spark_mnist.shards.commit`): it beats while its ingest lives, a clean-up
leaves a beating generation and removes a silent one, and an ingest whose lease was reaped publishes nothing.  The
same on every store, with writer processes: tests/test_stores.py."""

from __future__ import annotations

import json
import threading
import time

import pytest

import spark_mnist
from spark_mnist import fs
from spark_mnist.datasets import get_dataset
from spark_mnist.paths import normalize_uri
from spark_mnist.shards import commit
from spark_mnist.shards.arrays import write_local_dataset
from tests.stores.writer import SERIAL, arrays


@pytest.fixture(autouse=True)
def fast_lease(monkeypatch):
    """The lease's timings of the serial store writers: beats every 20 ms, silent for 100 ms is dead."""
    monkeypatch.setattr(commit, "HEARTBEAT_S", SERIAL[0])
    monkeypatch.setattr(commit, "LEASE_EXPIRY_S", SERIAL[1])


def _beat(lease: commit.Lease) -> int:
    return json.loads(commit.read_lease(lease.location))["beat"]


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_lease_beats_until_stopped_and_says_who_holds_it(tmp_path):
    out = normalize_uri(tmp_path / "out")
    with commit.writing(out) as lease:
        content = json.loads(commit.read_lease(lease.location))
        assert fs.list_names(out.join(lease.generation)) == [commit.LEASE_DIR]  # the generation's first object
        assert fs.list_names(out.join(lease.generation, commit.LEASE_DIR)) == [commit.LEASE_NAME]
        assert {"host", "pid", "time"} <= content.keys() and content["generation"] == lease.generation
        first = _beat(lease)
        _wait_for(lambda: _beat(lease) > first + 1, "the lease never beat")
        assert lease.holds() and not lease.reaped
        lease.stop()
        stopped = _beat(lease)
        time.sleep(5 * commit.HEARTBEAT_S)
        assert _beat(lease) == stopped  # no beat after stop


def test_a_reaped_lease_stops_beating_and_its_ingest_publishes_nothing(tmp_path):
    out = normalize_uri(tmp_path / "out")
    first = write_local_dataset(out.local_path, get_dataset("mnist"), arrays(1))
    with pytest.raises(commit.ReapedError, match="removed by another ingest's clean-up.*nothing was published"):
        with commit.writing(out) as lease:
            fs.delete(lease.location)  # what a clean-up that judged this ingest dead does first
            _wait_for(lambda: lease.reaped, "the heartbeat did not notice its lease was gone")
            assert commit.read_lease(lease.location) is None  # never written again
            commit.publish(out, first, lease)
    assert spark_mnist.open_dataset(out.local_path).manifest.generation == first.generation
    assert not fs.exists(out.join(lease.generation))  # discarded


def test_clean_leaves_a_beating_generation_and_removes_a_silent_one(tmp_path):
    out = normalize_uri(tmp_path / "out")
    spec = get_dataset("mnist")
    first = write_local_dataset(out.local_path, spec, arrays(1))
    with commit.writing(out) as silent:
        silent.stop()  # its ingest died: the lease stays, unchanged
        with commit.writing(out) as live:
            second = write_local_dataset(out.local_path, spec, arrays(2))  # its clean-up judges both
            names = set(fs.list_names(out))
            assert live.generation in names and silent.generation not in names
            assert {first.generation, second.generation} <= names
            assert live.holds()


def test_a_failed_write_stops_the_lease_and_discards_the_generation(tmp_path):
    out = normalize_uri(tmp_path / "out")
    with pytest.raises(RuntimeError, match="bad input found late"):
        with commit.writing(out) as lease:
            raise RuntimeError("bad input found late")
    assert not fs.exists(out)  # OUT was created by this ingest: gone too
    assert f"lease-{lease.generation}" not in {thread.name for thread in threading.enumerate()}  # stopped
