"""Cluster-shaped run: ingest and a short training on ``local-cluster[2,1,1024]`` (separate executor JVMs, as
Spark's own tests use) with ``TorchDistributor(local_mode=False)``, so shards are read and ranks run inside
executors rather than in the driver's process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import write_dataset

pytestmark = pytest.mark.slow


def test_ingest_and_train_on_local_cluster(tmp_path):
    import pyspark

    write_dataset(tmp_path / "source", train_rows=640, test_rows=130)
    env = {**os.environ, "SPARK_HOME": os.path.dirname(pyspark.__file__)}
    command = [sys.executable, "-m", "spark_mnist.cli", "run", "--master", "local-cluster[2,1,1024]",
               "--source", str(tmp_path / "source"), "--output", str(tmp_path / "data"),
               "--run-dir", str(tmp_path / "run"), "--no-local-mode", "--num-processes", "2", "--epochs", "1",
               "--batch-size", "32"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["world_size"] == 2 and metrics["steps_per_epoch"] == 10
    assert (tmp_path / "run" / "model.pt").exists()
    assert "epoch 1/1: train loss" in result.stdout + result.stderr
