"""Distributed training: a 2-process TorchDistributor run on a small subset, and resuming from a checkpoint.

Every lane's classic pass runs the uninterrupted run (with the converter ``auto`` picks there: the direct path where
petastorm cannot run), the direct path and petastorm where it can, and a failed rank; the lane that runs the ``full``
matrix also resumes after a SIGKILL, on its classic session (resuming after a stop: test_launch, under another
launcher)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from spark_mnist.config import TrainSettings, load_settings
from spark_mnist.driver.converter import choose_converter
from spark_mnist.driver.ingest import ingest
from spark_mnist.driver.session import is_connect
from spark_mnist.pipeline import train
from spark_mnist.runs import CHECKPOINT_NAME, MODEL_NAME, TrainingFailedError
from tests.conftest import requires_connect, requires_petastorm

pytestmark = [pytest.mark.slow, pytest.mark.connect]


@pytest.fixture(scope="module")
def small_dataset(spark, tmp_path_factory):
    from tests.conftest import write_dataset

    root = tmp_path_factory.mktemp("train")
    write_dataset(root / "source", train_rows=640, test_rows=130)
    ingest(spark, str(root / "source"), str(root / "data"), num_shards=3)
    return root


def settings_for(root, run_dir, **train):
    return load_settings(None, {"train": {"data": str(root / "data"), "run_dir": str(run_dir), "epochs": 2,
                                          "batch_size": 32, "num_processes": 2, "seed": 1,
                                          "petastorm_cache_url": (root / "cache").as_uri(), **train}})


class _Records(logging.Handler):
    """The log records of ``spark_mnist`` while a module-scoped run lasts (``caplog`` lives one test)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def full_run(spark, small_dataset):
    """The uninterrupted run, with the converter ``auto`` chooses in this lane; its metrics, run directory and the
    driver's ``spark_mnist`` log records."""
    skip_over_connect(spark)
    run_dir = small_dataset / "full"
    logger, handler = logging.getLogger("spark_mnist"), _Records()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        metrics = train(spark, settings_for(small_dataset, run_dir))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return metrics, run_dir, handler.records


def test_two_process_run_returns_metrics(full_run):
    metrics, run_dir, _ = full_run
    assert metrics["world_size"] == 2 and metrics["epochs"] == 2
    assert metrics["steps_per_epoch"] == (640 // 2) // 32
    assert metrics["samples_per_epoch"] == metrics["steps_per_epoch"] * 32 * 2
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["train_seconds"] > 0
    assert [h["test_samples"] for h in metrics["history"]] == [130, 130]  # the full test split
    assert all(0 <= h["data_wait_fraction"] < 1 for h in metrics["history"])
    state = torch.load(run_dir / MODEL_NAME, weights_only=True)
    assert "classifier.weight" in state
    assert json.loads((run_dir / "metrics.json").read_text())["world_size"] == 2


def skip_over_connect(spark) -> None:
    """Local mode runs torchrun beside the driver whatever the session, so over Spark Connect a local-mode run, its
    failed rank and resuming it are what the classic session checks: the Connect pass trains in local mode once,
    test_real_data's run on the real data, and this module's distributed-mode run (ranks in the server's tasks)."""
    if is_connect(spark):
        pytest.skip("local mode does not depend on the session: checked on the classic one (and test_real_data)")


@requires_petastorm
def test_petastorm_loader_runs_equal_steps(spark, small_dataset, tmp_path):
    metrics = train(spark, settings_for(small_dataset, tmp_path / "run", epochs=1, loader="petastorm"))
    assert metrics["loader"] == "petastorm" and metrics["steps_per_epoch"] == 10
    assert metrics["converter"] == "petastorm"


def test_converter_none_reads_the_ingested_shards(spark, small_dataset, tmp_path, caplog):
    """The direct path where ``auto`` takes petastorm: no converter cache, the same loader, steps and figures.
    Where ``auto`` reads the shards directly already (Spark 4, Spark Connect), the full run is this path."""
    if choose_converter(TrainSettings(), connect=is_connect(spark)).name != "petastorm":
        pytest.skip("converter auto reads the shards directly here: the full run took this path")
    caplog.set_level(logging.INFO, logger="spark_mnist")
    metrics = train(spark, settings_for(small_dataset, tmp_path / "run", epochs=1, converter="none"))
    assert metrics["converter"] == "none" and metrics["loader"] == "spark-mnist"
    assert metrics["steps_per_epoch"] == 10 and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert "converter: none, the ranks read the ingested shards (converter 'none' set)" in caplog.text


def test_auto_converter_says_which_path_it_took(spark, full_run):
    metrics, _, records = full_run  # converter: auto, the default
    expected = choose_converter(TrainSettings(), connect=is_connect(spark))
    assert metrics["converter"] == expected.name
    messages = [r.getMessage() for r in records]
    assert sum("converter: " in m for m in messages) == 1 and expected.reason in "\n".join(messages)


@requires_connect
def test_distributed_mode_over_connect_ends_with_its_last_epoch(spark, small_dataset, tmp_path, monkeypatch):
    """TorchDistributor(local_mode=False) over a Spark Connect session: the ranks run in the server's tasks, and the
    launch returns within 30 s of the last epoch's end (rank 0 writes ``metrics.json`` right after it).  In 3 of 6
    Connect passes (of both Spark 4 lanes, then) this run once took ~300 s longer, the wait torch's elastic
    agents can hold at their exit barrier (launch/torch_distributor.py, issue 28)."""
    import os
    import time

    from spark_mnist.launch import torch_distributor

    returned = {}
    launch = torch_distributor.run

    def timed(fn, job):
        try:
            return launch(fn, job)
        finally:
            returned["at"] = time.time()

    monkeypatch.setattr(torch_distributor, "run", timed)
    run_dir = tmp_path / "run"
    metrics = train(spark, settings_for(small_dataset, run_dir, epochs=1, local_mode=False))
    assert metrics["world_size"] == 2 and metrics["converter"] == "none" and metrics["steps_per_epoch"] == 10
    assert (run_dir / MODEL_NAME).exists()
    after_last_epoch = returned["at"] - os.path.getmtime(run_dir / "metrics.json")
    assert 0 <= after_last_epoch < 30, f"the launch returned {after_last_epoch:.0f} s after the last epoch ended"


def test_failed_rank_surfaces_on_the_driver(spark, small_dataset, tmp_path, caplog):
    skip_over_connect(spark)
    # 640 rows cannot give each of 2 ranks a batch of 1,000: every rank raises before training, with bad input
    # (an InputError, a ValueError), which a relaunch would meet again: not relaunched (max_restarts is 1).
    with caplog.at_level(logging.WARNING, logger="spark_mnist"):
        with pytest.raises(TrainingFailedError, match=r"rank \d failed: InputError: 640 training rows cannot give"):
            train(spark, settings_for(small_dataset, tmp_path / "run", batch_size=1000))
    assert "restart" not in caplog.text


def _children(pid: int) -> list[int]:
    """The child processes of ``pid``, whichever of its threads started them."""
    import os

    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return found


def _torchrun_children() -> list[int]:
    """The rank processes of this test's running local-mode TorchDistributor: the children of the
    torch.distributed.run among this process's descendants (never another test run's, on a machine running lanes
    side by side)."""
    import os

    todo = _children(os.getpid())
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"torch.distributed.run" in f.read():
                    return _children(pid)
        except OSError:
            continue
        todo.extend(_children(pid))
    return []


@pytest.mark.full
def test_sigkill_one_rank_then_resume_matches_uninterrupted_run(spark, small_dataset, full_run, tmp_path):
    import os
    import signal
    import threading
    import time

    skip_over_connect(spark)
    full, _, _ = full_run
    run_dir = tmp_path / "killed"
    outcome = {}

    def run():
        try:
            outcome["metrics"] = train(spark, settings_for(small_dataset, run_dir, checkpoint_every_steps=1,
                                                          max_restarts=0))
        except TrainingFailedError as e:
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 300
    while not (run_dir / CHECKPOINT_NAME).exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    ranks = _torchrun_children()
    assert ranks, "no rank process found to kill"
    os.kill(ranks[-1], signal.SIGKILL)
    thread.join(timeout=300)
    assert "error" in outcome, "the run finished before a rank could be killed"
    state = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["loader"]
    assert (state["epoch"], state["step"]) < (2, 0)
    resumed = train(spark, settings_for(small_dataset, run_dir, resume=True))
    assert resumed["test_accuracy"] == pytest.approx(full["test_accuracy"])
