"""Cluster-shaped run: ingest and a short training on ``local-cluster[1,2,1024]`` (an executor JVM apart from the
driver's, as Spark's own tests use) with ``TorchDistributor(local_mode=False)``, so shards are read and ranks run inside
the executor's tasks rather than in the driver's process.

One executor with two cores rather than two of one core each (``local-cluster[2,1,1024]``): the two barrier tasks
still run apart from the driver, and one JVM fewer starts on CI's two cores.  Every address is the loopback one
(``SPARK_LOCAL_IP``): the executor then reaches the driver without the machine's hostname or outward interface."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import write_dataset

pytestmark = [pytest.mark.slow, pytest.mark.full]  # a driver JVM, an executor JVM and two ranks: one lane runs it


def test_ingest_and_train_on_local_cluster(tmp_path):
    import pyspark

    write_dataset(tmp_path / "source", train_rows=640, test_rows=130)
    env = {**os.environ, "SPARK_HOME": os.path.dirname(pyspark.__file__), "SPARK_LOCAL_IP": "127.0.0.1"}
    # The executor JVM takes the Java options the test run gives the driver's (SPARK_SUBMIT_OPTS, which reaches
    # spark-submit only: Makefile TEST_JVM_OPTS), through the session's conf.
    config = tmp_path / "executor.yaml"
    config.write_text(json.dumps({"spark": {"conf": {"spark.executor.extraJavaOptions":
                                                     os.environ.get("SPARK_SUBMIT_OPTS", "")}}}))
    command = [sys.executable, "-m", "spark_mnist.cli", "run", "--config", str(config),
               "--master", "local-cluster[1,2,1024]",
               "--source", str(tmp_path / "source"), "--output", str(tmp_path / "data"),
               "--run-dir", str(tmp_path / "run"), "--no-local-mode", "--num-processes", "2", "--epochs", "1",
               "--batch-size", "32"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["world_size"] == 2 and metrics["steps_per_epoch"] == 10
    assert (tmp_path / "run" / "model.pt").exists()
    assert "epoch 1/1: train loss" in result.stdout + result.stderr
