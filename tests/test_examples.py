"""examples/: the serverless-GPU training function runs end to end on CPU processes, under a stand-in for
``databricks.air.distributed`` installed at the import boundary (tests/fake_air first on PYTHONPATH): the example's
own code, imports and ``@distributed`` call are the ones a user runs."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "serverless_gpu_train.py"
FAKE_AIR = REPO / "tests" / "fake_air"


@pytest.fixture(scope="module")
def dataset(spark, tmp_path_factory):
    from tests.test_launch import ingested

    return ingested(spark, tmp_path_factory.mktemp("examples"), 320, 70, 2)


@pytest.mark.slow
@pytest.mark.full
def test_serverless_gpu_example_trains_on_two_cpu_processes(dataset, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAKE_AIR), str(REPO)])}
    command = [sys.executable, str(EXAMPLE), "--data", str(dataset), "--run-dir", str(tmp_path / "run"),
               "--accelerators", "2", "--epochs", "1", "--batch-size", "32"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["world_size"] == 2 and metrics["device"] == "cpu" and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert (tmp_path / "run" / "model.pt").exists() and (tmp_path / "run" / "own-loop-checkpoint.pt").exists()
    # A second run with the same run_dir and more epochs continues from the loader's saved position.
    result = subprocess.run(command[:-4] + ["--epochs", "2", "--batch-size", "32"], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["epochs"] == 2


def test_the_examples_call_binds_to_the_real_databricks_air(monkeypatch):
    """Where databricks-sdk-air[distributed] is installed (lane spark40): the example's decorator call binds to the
    real signature, and ``train`` takes the positional arguments the example passes to ``.distributed``."""
    monkeypatch.setenv("DATABRICKS_INTERNAL_BETA_WARNING_PRINTED", "1")  # the package sets it on import
    launcher = pytest.importorskip("databricks.air.launcher", reason="databricks-sdk-air[distributed] not installed")
    import importlib.util

    spec = importlib.util.spec_from_file_location("serverless_gpu_train", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    inspect.signature(launcher.distributed).bind(num_accelerators=8, accelerator_type="GPU_8xH100", remote=True)
    inspect.signature(example.train).bind("/Volumes/c/s/v/parquet/mnist", "/Volumes/c/s/v/runs/x", 2, 64)
