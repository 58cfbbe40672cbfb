"""The dataset contract (``spark_mnist.shards.contract``): open_dataset reads only what the manifest names, checks
every file's size first, refuses a schema-1 dataset in one line, and Parquet page checksums catch corruption."""

from __future__ import annotations

import json

import numpy as np
import pytest

import spark_mnist
from spark_mnist.errors import DatasetNotFoundError
from spark_mnist.datasets import get_dataset
from spark_mnist.shards import contract
from spark_mnist.shards.arrays import write_local_dataset
from spark_mnist.shards.parquet import PAGE_CHECKSUMS, plan_row_groups, read_rows


@pytest.fixture
def out(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {split: (rng.integers(0, 256, (rows, 28, 28), dtype=np.uint8), np.arange(rows) % 10)
              for split, rows in (("train", 50), ("test", 20))}
    write_local_dataset(tmp_path / "out", get_dataset("mnist"), arrays, num_shards=2, rows_per_group=10)
    return tmp_path / "out"


def test_open_dataset_gives_files_shape_classes_rows(out):
    dataset = spark_mnist.open_dataset(out)
    assert dataset.image_shape == (28, 28) and dataset.classes == tuple(str(i) for i in range(10))
    assert (dataset.rows("train"), dataset.rows("test")) == (50, 20) and dataset.splits == ["train", "test"]
    generation = dataset.manifest.generation
    assert dataset.files("train") == [(out / generation / "train" / f"part-0000{k}.parquet").as_uri()
                                      for k in range(2)]
    assert dataset.paths("test")[0] == str(out / generation / "test" / "part-00000.parquet")
    with pytest.raises(ValueError, match=r"^Invalid split: 'dev'\. Must be one of 'train', 'test'\.$"):
        dataset.files("dev")


def test_a_missing_or_resized_file_is_one_error_naming_it(out):
    shard = out / spark_mnist.open_dataset(out).manifest.splits["test"].files[1].path
    data = shard.read_bytes()
    shard.write_bytes(data + b"x")
    with pytest.raises(DatasetNotFoundError, match=rf"^{shard}: {len(data) + 1} bytes, the manifest says "
                                                   rf"{len(data)}"):
        spark_mnist.open_dataset(out)
    shard.unlink()
    with pytest.raises(DatasetNotFoundError, match=rf"^{shard}: missing; the manifest names it"):
        spark_mnist.open_dataset(out)


def test_no_manifest_and_schema_1_are_one_line_each(out, tmp_path):
    with pytest.raises(DatasetNotFoundError, match=rf"^{tmp_path / 'none' / '_manifest.json'}: no manifest"):
        spark_mnist.open_dataset(tmp_path / "none")
    (out / contract.MANIFEST_NAME).write_text(json.dumps({"schema_version": 1, "dataset": "mnist"}))
    with pytest.raises(DatasetNotFoundError) as caught:
        spark_mnist.open_dataset(out)
    assert str(caught.value) == (f"{out / contract.MANIFEST_NAME}: a dataset of schema version 1 (spark-mnist 0.1), "
                                 f"which this version no longer reads; re-ingest it with `spark-mnist ingest`")


@pytest.mark.skipif(not PAGE_CHECKSUMS, reason="pyarrow < 15 neither writes nor verifies Parquet page checksums")
def test_a_flipped_byte_inside_a_shard_fails_its_page_checksum(out):
    dataset = spark_mnist.open_dataset(out)
    shard = out / dataset.manifest.splits["train"].files[0].path
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the image column's pages; the size stays, so only the checksum can tell
    shard.write_bytes(bytes(data))
    plan = plan_row_groups(spark_mnist.open_dataset(out).files("train"))
    with pytest.raises(OSError, match="(?i)checksum|crc"):
        read_rows(plan, 0, 25, 784)
