"""The write job's task side without Spark: the fragments the driver sends give each task its shard whole, and a
task missing a fragment writes nothing."""

from __future__ import annotations

import pickle
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spark_mnist.driver.write_job import fragments_table
from spark_mnist.tasks import write as write_module
from spark_mnist.tasks.write import WritePlan, write_from_broadcast, write_from_relation, write_shards
from tests.conftest import make_arrays


def _plan_and_batches(tmp_path, fragment_rows):
    images, labels = make_arrays(100)
    shards = [(f"G/train/part-0000{k}.parquet", lo, images[lo:hi], labels[lo:hi])
              for k, (lo, hi) in enumerate([(0, 40), (40, 100)])]  # path, first global row, images, labels
    plan = WritePlan(str(tmp_path), (("G/train/part-00000.parquet", 0, 40), ("G/train/part-00001.parquet", 40, 60)),
                     (28, 28), 16, fragment_rows, 2)
    return (images, labels), plan, fragments_table(shards, plan).to_batches()


def _check_shards(tmp_path, plan, arrays, reports):
    assert [(r["unit"], r["rows"]) for r in reports] == [(0, 40), (1, 60)]
    for unit, (lo, hi) in enumerate([(0, 40), (40, 100)]):
        path = tmp_path / plan.shards[unit][0]
        table = pq.read_table(path)
        assert table.column("index").to_pylist() == list(range(lo, hi))
        pixels = np.stack([np.frombuffer(b, np.uint8) for b in table.column("image").to_pylist()])
        assert np.array_equal(pixels, arrays[0][lo:hi].reshape(hi - lo, -1))
        assert np.array_equal(table.column("label").to_numpy(), arrays[1][lo:hi])
        assert reports[unit]["bytes"] == path.stat().st_size


def test_fragments_become_the_shards_again(tmp_path):
    arrays, plan, batches = _plan_and_batches(tmp_path, fragment_rows=7)
    assert [plan.fragments(u) for u in range(2)] == [6, 9]
    table = pa.Table.from_batches(batches)
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))  # any order, any batches
    reports = [batch.to_pylist()[0] for batch in write_from_relation(plan, iter(shuffled.to_batches(max_chunksize=4)))]
    _check_shards(tmp_path, plan, arrays, reports)


def test_the_broadcast_table_is_written_without_copying_its_bytes(tmp_path, monkeypatch):
    arrays, plan, batches = _plan_and_batches(tmp_path, fragment_rows=7)
    table = pickle.loads(pickle.dumps(pa.Table.from_batches(batches)))  # as the broadcast variable arrives
    sent = np.frombuffer(table["images"].chunk(0).buffers()[2], np.uint8)
    views = []

    def write_shard(target, path, images, labels, start, rows_per_group):
        views.append(np.shares_memory(images, sent))
        return real_write_shard(target, path, images, labels, start, rows_per_group)

    real_write_shard = write_module.write_shard
    monkeypatch.setattr(write_module, "write_shard", write_shard)
    shipped = types.SimpleNamespace(value=table)  # a broadcast variable's handle
    reports = sorted((dict(zip(("unit", "rows", "bytes"), report)) for task in (1, 0)  # each task's partition
                      for report in write_from_broadcast(plan, shipped, iter([task]))), key=lambda r: r["unit"])
    _check_shards(tmp_path, plan, arrays, reports)
    assert views == [True, True]


def test_a_task_missing_a_fragment_writes_no_shard(tmp_path):
    _, plan, batches = _plan_and_batches(tmp_path, fragment_rows=7)
    (table,) = batches
    with pytest.raises(RuntimeError, match="received fragments"):
        list(write_shards(plan, iter([table.filter(np.arange(table.num_rows) != 2)])))
    assert not (tmp_path / plan.shards[0][0]).exists()
