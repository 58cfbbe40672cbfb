"""The write job's task side without Spark: the fragments the driver sends give each task its shard whole, and a
task missing a fragment writes nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from spark_mnist.driver.plan import Piece, write_plan
from spark_mnist.driver.write_job import fragments_table
from spark_mnist.tasks.write import write_shards
from tests.conftest import make_arrays


def _plan_and_batches(tmp_path, fragment_rows):
    images, labels = make_arrays(100)
    pieces = [Piece("train", 0, (0, 40, 100), images, labels)]
    plan = write_plan(pieces, str(tmp_path), "G", row_group_bytes=16 * 784)
    plan = dataclasses.replace(plan, fragment_rows=fragment_rows)
    return pieces, plan, fragments_table(pieces, plan).to_batches()


def test_fragments_become_the_shards_again(tmp_path):
    pieces, plan, batches = _plan_and_batches(tmp_path, fragment_rows=7)
    assert [plan.fragments(u) for u in range(2)] == [6, 9]
    reports = [batch.to_pylist()[0] for batch in write_shards(plan, iter(batches[::-1]))]  # any order
    assert [(r["unit"], r["rows"]) for r in reports] == [(0, 40), (1, 60)]
    for unit, (lo, hi) in enumerate([(0, 40), (40, 100)]):
        table = pq.read_table(tmp_path / plan.path(unit))
        assert table.column("index").to_pylist() == list(range(lo, hi))
        pixels = np.stack([np.frombuffer(b, np.uint8) for b in table.column("image").to_pylist()])
        assert np.array_equal(pixels, pieces[0].images[lo:hi].reshape(hi - lo, -1))
        assert np.array_equal(table.column("label").to_numpy(), pieces[0].labels[lo:hi])
        assert reports[unit]["bytes"] == (tmp_path / plan.path(unit)).stat().st_size


def test_a_task_missing_a_fragment_writes_no_shard(tmp_path):
    _, plan, batches = _plan_and_batches(tmp_path, fragment_rows=7)
    (table,) = batches
    with pytest.raises(RuntimeError, match="received fragments"):
        list(write_shards(plan, iter([table.filter(np.arange(table.num_rows) != 2)])))
    assert not (tmp_path / plan.path(0)).exists()
