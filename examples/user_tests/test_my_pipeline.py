"""An example of a user's own tests on spark-mnist's test kit (``spark_mnist.testing``): a pipeline that ingests
MNIST with Spark and trains on it, tested in local mode.  Copy this file and ``conftest.py`` next to your code.

CI runs it against the installed wheel, from a directory outside the source tree (``make test-kit``).
"""

from __future__ import annotations

import hashlib

import pytest

import spark_mnist
from spark_mnist.testing import run_ranks


# --- the user's code under test (in a real project it lives in the user's package) -----------------------------------

def ingest_for_training(spark, source_dir, output_dir) -> dict[str, int]:
    """The user's pipeline step: ingest the IDX files with Spark; the rows of each split."""
    spark_mnist.ingest(spark, str(source_dir), str(output_dir), dataset="mnist", num_shards=2)
    dataset = spark_mnist.open_dataset(output_dir)
    return {split: dataset.rows(split) for split in ("train", "test")}


def rank_epoch(data_dir: str) -> list[str]:
    """The user's per-rank code: one training epoch through spark-mnist's loader; the sha1 of every image this rank
    saw."""
    from spark_mnist.torch import loader

    seen = []
    with loader(data_dir, split="train", batch_size=16, seed=0) as batches:
        for images, labels in batches:
            assert images.shape[1:] == (1, 28, 28) and str(images.dtype) == "torch.uint8"
            assert labels.shape == (len(images),)
            seen += [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images]
    return seen


# --- the tests --------------------------------------------------------------------------------------------------------

def test_ingest_for_training_counts_rows(spark, idx_source, tmp_path):
    source = idx_source("mnist", train_rows=300, test_rows=50)
    assert ingest_for_training(spark, source.path, tmp_path / "mnist") == {"train": 300, "test": 50}


@pytest.mark.parametrize("defect", ["truncated", "html", "wrong-magic", "labels-out-of-range", "count-mismatch"])
def test_ingest_for_training_refuses_bad_files_and_writes_nothing(spark, idx_source, tmp_path, defect):
    source = idx_source("mnist", train_rows=100, test_rows=20, defect=defect)
    with pytest.raises(ValueError, match=source.defect_file.name):
        ingest_for_training(spark, source.path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_training_sample_reaches_one_rank_at_most_once(ingested_dataset):
    data = ingested_dataset("mnist", train_rows=200, test_rows=40, num_shards=3)
    per_rank = run_ranks(rank_epoch, 2, str(data))
    assert [len(seen) for seen in per_rank] == [(200 // 2) // 16 * 16] * 2  # equal full steps on every rank
    seen = per_rank[0] + per_rank[1]
    assert len(set(seen)) == len(seen)  # no image twice in the epoch, across the ranks
