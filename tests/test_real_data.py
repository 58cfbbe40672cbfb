"""Real data: the Debian Fashion-MNIST files through Spark ingest."""

from __future__ import annotations

import pytest

from spark_mnist.shards import contract
from spark_mnist.driver.ingest import ingest
from tests.conftest import FASHION_DIR

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="apt-get install dataset-fashion-mnist provides /usr/share/datasets/fashion-mnist")
def test_ingest_debian_fashion_mnist(spark, tmp_path):
    manifest = ingest(spark, str(FASHION_DIR), str(tmp_path / "fashion"), strict=True)
    splits = manifest["splits"]
    assert splits["train"]["rows"] + splits["test"]["rows"] == 70_000
    assert splits["train"]["label_histogram"] == [6_000] * 10
    assert splits["test"]["label_histogram"] == [1_000] * 10
    assert all(f["sha256_matches"] for f in manifest["source"]["files"])
    shards = spark.sparkContext.defaultParallelism  # the default: one shard per core
    assert len(contract.split_files(tmp_path / "fashion", manifest, "train")) == shards
