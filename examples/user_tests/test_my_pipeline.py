"""An example of a user's own tests on spark-mnist's test kit (``spark_mnist.testing``): a pipeline that ingests
MNIST with Spark and trains on it, tested in local mode.  Copy this file and ``conftest.py`` next to your code.

CI runs it against the installed wheel, from a directory outside the source tree (``make test-kit``).
"""

from __future__ import annotations

import numpy as np
import pytest

import spark_mnist
from spark_mnist.testing import run_ranks


# --- the user's code under test (in a real project it lives in the user's package) -----------------------------------

def ingest_for_training(spark, source_dir, output_dir) -> dict:
    """The user's pipeline step: ingest the IDX files with Spark and return the rows of each split."""
    manifest = spark_mnist.ingest(spark, str(source_dir), str(output_dir), dataset="mnist", num_shards=2)
    return {split: spark_mnist.open_dataset(output_dir).rows(split) for split in ("train", "test")}


def rank_label_sum(data_dir: str) -> tuple[int, int]:
    """The user's per-rank code: one epoch of the training split through spark-mnist's loader; returns (samples,
    label sum) this rank saw."""
    import torch.distributed as dist
    from spark_mnist.torch import loader

    samples = labels = 0
    with loader(data_dir, split="train", batch_size=16, seed=0) as batches:
        for images, targets in batches:
            assert images.dtype.is_floating_point is False and images.shape[1:] == (28, 28)
            samples += len(targets)
            labels += int(targets.sum())
    assert dist.get_world_size() == 2
    return samples, labels


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


def test_every_training_sample_reaches_exactly_one_rank(ingested_dataset):
    data = ingested_dataset("mnist", train_rows=200, test_rows=40, num_shards=3)
    per_rank = run_ranks(rank_label_sum, 2, str(data))
    train = spark_mnist.open_dataset(data)
    labels = np.concatenate([batch.column("label").to_numpy() for batch in train.batches("train")])
    assert sum(samples for samples, _ in per_rank) == 2 * ((200 // 2) // 16) * 16  # full steps on every rank
    assert sum(total for _, total in per_rank) <= int(labels.sum())
