"""The notebook API: spark_mnist.ingest and spark_mnist.train at the package's top level, with the settings of the
command line, returning the manifest and the metrics."""

from __future__ import annotations

import json

import pytest

import spark_mnist
from spark_mnist.errors import InputError


@pytest.mark.slow
@pytest.mark.full
def test_ingest_then_train_with_torchrun(spark, small_source, tmp_path):
    source, _ = small_source
    manifest = spark_mnist.ingest(spark, str(source), str(tmp_path / "data"), dataset="fashion-mnist", num_shards=2)
    assert manifest.dataset == "fashion-mnist" and manifest.splits["train"].rows == 600
    metrics = spark_mnist.train(str(tmp_path / "data"), launcher="torchrun", run_dir=str(tmp_path / "run"), epochs=1,
                                batch_size=50, num_processes=2)
    assert metrics["launcher"] == "torchrun" and metrics["world_size"] == 2 and metrics["steps_per_epoch"] == 6
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2


def test_unknown_settings_are_refused_naming_them(tmp_path):
    with pytest.raises(InputError, match=r"Invalid train setting: 'epoch'\. Must be one of .*'epochs'"):
        spark_mnist.train(str(tmp_path), epoch=3)
    with pytest.raises(InputError, match=r"Invalid ingest setting: 'shards'"):
        spark_mnist.ingest(None, "src", "out", shards=3)
    with pytest.raises(InputError, match=r"launcher: unexpected value; permitted: .torch-distributor., .torchrun."):
        spark_mnist.train(str(tmp_path), launcher="mpirun")


def test_the_notebook_api_on_databricks_starts_from_the_databricks_defaults(monkeypatch):
    """Without a config file the notebook API takes the cluster's session, the workers' GPUs and the shards read
    directly on Databricks (a driver-local petastorm cache and local mode would not serve a cluster); the keywords
    still win, and off Databricks the local defaults stand."""
    import spark_mnist
    from spark_mnist.config import DATABRICKS_DEFAULTS

    local = spark_mnist._settings(None, "train", {"data": "/Volumes/main/default/mnist/parquet/mnist"})
    assert local.spark.master == "local[2]" and not local.train.use_gpu and local.train.local_mode
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    settings = spark_mnist._settings(None, "train", {"data": "/Volumes/main/default/mnist/parquet/mnist"})
    assert settings.spark.master is None
    assert {k: getattr(settings.train, k) for k in DATABRICKS_DEFAULTS["train"]} == DATABRICKS_DEFAULTS["train"]
    assert not spark_mnist._settings(None, "train", {"data": "/x/y", "use_gpu": False}).train.use_gpu
