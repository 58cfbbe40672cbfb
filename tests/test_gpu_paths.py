"""The per-rank function's CUDA paths: one rank trained on a GPU (nccl bound to its device, synchronized epoch
timings) leaves files a CPU-only process loads with a plain ``torch.load``; a ``LOCAL_RANK`` past the visible
devices is refused.  Skipped without CUDA (``make gpu-check`` runs them)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from spark_mnist.runs import CHECKPOINT_NAME, MODEL_NAME
from tests.conftest import REPO
from tests.test_train_worker import (free_port, job_for, one_rank, rank_environment,  # noqa: F401 - fixtures
                                     splits)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CPU_ONLY_LOAD = """
import sys, torch
assert not torch.cuda.is_available()
for name in sys.argv[1:]:
    state = torch.load(name)
    model = state["model"] if "optimizer" in state else state
    assert all(t.device.type == "cpu" for t in model.values()), name
print("loaded")
"""


def test_cuda_training_saves_files_a_cpu_machine_loads(one_rank, splits, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    metrics = one_rank(job_for(splits, run_dir, use_gpu=True, epochs=1))
    assert metrics["device"] == "cuda" and metrics["history"][0]["epoch_seconds"] > 0
    assert 0 <= metrics["history"][0]["data_wait_fraction"] <= 1
    state = torch.load(run_dir / MODEL_NAME)
    assert all(t.device.type == "cpu" for t in state.values())
    result = subprocess.run([sys.executable, "-c", CPU_ONLY_LOAD, str(run_dir / MODEL_NAME),
                             str(run_dir / CHECKPOINT_NAME)], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0 and "loaded" in result.stdout, result.stderr[-3000:]


def test_a_local_rank_past_the_visible_gpus_is_refused(splits, tmp_path, monkeypatch):  # noqa: F811
    from spark_mnist.errors import EnvironmentMismatchError
    from spark_mnist.rank.train import train_worker

    count = torch.cuda.device_count()
    for name, value in rank_environment(count, count + 1, free_port()).items():
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(EnvironmentMismatchError, match=rf"LOCAL_RANK {count} has no GPU of its own"):
            train_worker(job_for(splits, tmp_path / "run", use_gpu=True))
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "run" / "_errors" / f"rank-{count}.json").exists()


def test_data_wait_on_cuda_is_the_time_the_device_sat_idle():
    """A slow fetch while the GPU is idle counts; the same fetch while the GPU is still busy with the step (a kernel
    of about 0.1 s) does not: only the tiny copy after the kernel does."""
    from spark_mnist.rank.device import DataWait

    device = torch.device("cuda", torch.cuda.current_device())

    def slow():
        for _ in range(3):
            time.sleep(0.02)
            yield (torch.zeros(2, 1, 8, 8, dtype=torch.uint8).pin_memory(),
                   torch.zeros(2, dtype=torch.int64).pin_memory())

    idle, batches = DataWait(device), slow()
    for _ in range(3):
        images, labels = idle.next(batches)
    assert images.device == device and labels.device == device
    assert 0.06 <= idle.seconds() < 0.5
    busy, batches = DataWait(device), slow()
    for _ in range(3):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of the device's clock cycles
        busy.next(batches)
    assert busy.seconds() < 0.01
