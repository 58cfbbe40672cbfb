"""Refusals on the driver before anything launches: a ``--resume`` the checkpoint decides against (seed, dataset,
global batch, a world size that does not divide it) under every launcher and through the notebook API, and launcher
settings that cannot run (more local-mode GPUs than there are, a driver-local run directory for ranks on the
executors, a serverless run across nodes).  Exit 2 with one stderr line, nothing started, nothing written.

No rank runs here: the checkpoints are planted (a loader state as training writes it, empty model and optimizer),
and the launchers' ``run`` is replaced by one that fails the test if it is reached.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from spark_mnist.cli import main
from spark_mnist.config import load_settings
from spark_mnist.errors import InputError, LoaderStateError
from spark_mnist.launch import LauncherUnavailableError
from spark_mnist.rank.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from spark_mnist.runs import CHECKPOINT_NAME, ERRORS_DIR, dataset_identity
from spark_mnist.testing import write_ingested_dataset

TRAIN_ROWS = 640
# The run whose checkpoint is planted: seed 0, 2 ranks of 32 (global batch 64), mid-epoch 2.
SAVED = {"seed": 0, "epoch": 1, "step": 3, "samples": 3 * 64, "world_size": 2, "batch_size": 32,
         "global_batch_size": 64, "rows": TRAIN_ROWS, "shuffle": True, "drop_remainder": True}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small ingested dataset, written without Spark."""
    return write_ingested_dataset(tmp_path_factory.mktemp("refusals") / "data", "fashion-mnist",
                                  train_rows=TRAIN_ROWS, test_rows=130, num_shards=3)


@pytest.fixture(scope="module")
def identity(data) -> str:
    from spark_mnist.shards.contract import open_dataset

    return dataset_identity(open_dataset(str(data)).manifest)


@pytest.fixture
def run_dir(tmp_path, identity) -> Path:
    """A run directory holding a seed-0 checkpoint of the dataset (2 ranks x 32), and an old metrics file."""
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(Checkpoint(model={}, optimizer={}, loader={**SAVED, "dataset": identity}), str(run))
    (run / "metrics.json").write_text("{}")
    return run


@pytest.fixture
def nothing_launches(monkeypatch):
    """Every launcher's ``run`` and the pipeline's Spark session fail the test when reached (in-process ``main``)."""
    def reached(*args, **kwargs):
        raise AssertionError("a launcher or a Spark session was started")

    for run in ("run_torchrun", "torch_distributor.run", "run_ai_runtime"):
        monkeypatch.setattr(f"spark_mnist.launch.{run}", reached)
    monkeypatch.setattr("spark_mnist.driver.session.spark_session", reached)


def listing(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``directory``: relative path -> (mtime in ns, size in bytes)."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = Path(root) / name
            st = path.stat()
            found[str(path.relative_to(directory))] = (st.st_mtime_ns, st.st_size)
    return found


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--run-dir", str(run_dir), "--resume", "--epochs", "2", "--batch-size",
            "32", "--num-processes", "2", "--seed", "0", *extra]


MISMATCHES = {
    "seed": (["--seed", "7"], r"Cannot resume: the seed is 0 in {checkpoint}, 7 in this run."),
    "global batch": (["--batch-size", "16"], "Cannot resume: the global batch size is 64 in {checkpoint}, 32 in "
                                             "this run (batch size 16 x 2 ranks)."),
    "world size": (["--num-processes", "3"], "Cannot resume: the global batch size 64 of {checkpoint} does not split "
                                             "over 3 ranks; resume on one of 1, 2, 4, 8 ranks."),
}


@pytest.mark.parametrize("launcher", ["torchrun", "torch-distributor"])
@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_a_resume_the_checkpoint_refuses_exits_2_before_anything_starts(data, run_dir, nothing_launches, capsys,
                                                                         launcher, case):
    extra, message = MISMATCHES[case]
    before = listing(run_dir)
    assert main(train_args(data, run_dir, "--launcher", launcher, *extra)) == 2
    line = one_error_line(capsys)
    assert line == "spark-mnist: error: " + message.format(checkpoint=run_dir / CHECKPOINT_NAME)
    assert listing(run_dir) == before and not (run_dir / ERRORS_DIR).exists()


@pytest.mark.parametrize("launcher", ["torchrun", "torch-distributor"])
def test_a_checkpoint_of_other_data_exits_2_naming_both(data, tmp_path, nothing_launches, capsys, launcher):
    run = tmp_path / "other"
    run.mkdir()
    save_checkpoint(Checkpoint(model={}, optimizer={}, loader={**SAVED, "dataset": "generation:elsewhere"}), str(run))
    before = listing(run)
    assert main(train_args(data, run, "--launcher", launcher)) == 2
    line = one_error_line(capsys)
    assert "Cannot resume: the dataset is 'generation:elsewhere' in" in line and "in this run." in line
    assert listing(run) == before


def test_an_unreadable_checkpoint_exits_2_before_anything_starts(data, tmp_path, nothing_launches, capsys):
    run = tmp_path / "garbage"
    run.mkdir()
    (run / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    assert main(train_args(data, run, "--launcher", "torchrun")) == 2
    assert f"{run / CHECKPOINT_NAME}: refused or unreadable" in one_error_line(capsys)


def test_the_notebook_api_raises_the_one_error(data, run_dir, nothing_launches):
    import spark_mnist

    before = listing(run_dir)
    for launcher in ("torchrun", "torch-distributor"):
        with pytest.raises(LoaderStateError, match=r"^Cannot resume: the seed is 0 in .*, 7 in this run\.$"):
            spark_mnist.train(str(data), launcher=launcher, run_dir=str(run_dir), resume=True, seed=7,
                              batch_size=32, num_processes=2)
    assert listing(run_dir) == before


def test_the_pipeline_refuses_on_a_spark_session_before_the_distributor_runs(spark, data, run_dir,
                                                                             nothing_launches):
    """pipeline.train itself (a caller with its own session, as the CLI's ``run``): refused after the dataset
    opens and before petastorm's converter or TorchDistributor starts."""
    from spark_mnist.pipeline import train

    settings = load_settings(None, {"train": {"data": str(data), "run_dir": str(run_dir), "resume": True, "seed": 7,
                                              "batch_size": 32, "num_processes": 2}})
    before = listing(run_dir)
    with pytest.raises(LoaderStateError, match=r"the seed is 0 in"):
        train(spark, settings)
    assert listing(run_dir) == before


@pytest.mark.parametrize(("settings", "resumes"), [
    ({"seed": 0, "batch_size": 32, "num_processes": 2}, True),
    ({"seed": 0, "batch_size": 16, "num_processes": 4}, True),  # the same global batch on 4 ranks
    ({"seed": 0, "batch_size": 7, "num_processes": 8}, True),  # another world size: its batch is the checkpoint's
    ({"seed": 0, "batch_size": 32, "num_processes": 3}, False),
])
def test_check_resume_accepts_what_the_ranks_accept(data, run_dir, settings, resumes):
    from spark_mnist.pipeline import check_resume
    from spark_mnist.shards.contract import open_dataset

    resolved = load_settings(None, {"train": {"data": str(data), "run_dir": str(run_dir), "resume": True,
                                              **settings}})
    manifest = open_dataset(str(data)).manifest
    if resumes:
        check_resume(resolved, manifest)
    else:
        with pytest.raises(LoaderStateError):
            check_resume(resolved, manifest)
    check_resume(resolved.copy(update={"train": resolved.train.copy(update={"resume": False, "seed": 9})}), manifest)
    empty = load_settings(None, {"train": {"data": str(data), "run_dir": str(run_dir / "none"), "resume": True}})
    check_resume(empty, manifest)  # no checkpoint: the ranks start afresh


def test_a_checkpoint_error_is_an_input_error():
    assert issubclass(CheckpointError, InputError) and issubclass(LoaderStateError, InputError)


# --- launchers ------------------------------------------------------------------------------------------------


def test_local_mode_gpus_above_the_drivers_are_refused(data, tmp_path, nothing_launches, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["train", "--data", str(data), "--run-dir", str(tmp_path / "run"), "--use-gpu", "--num-processes",
                 "2"]) == 2
    line = one_error_line(capsys)
    assert "launcher 'torch-distributor' needs 2 GPU(s) on this machine and torch sees 1" in line
    assert "--no-local-mode" in line and not (tmp_path / "run").exists()


class FakeSession:
    """What the pipeline reads of a classic session: its master URL."""

    def __init__(self, master: str):
        self.sparkContext = types.SimpleNamespace(master=master)


@pytest.mark.parametrize(("run_dir", "master", "refused"), [
    ("/tmp/spark-mnist-run", "spark://10.0.0.1:7077", True),
    ("runs/x", "spark://10.0.0.1:7077", True),
    ("file:/tmp/x", "yarn", True),
    ("/tmp/spark-mnist-run", None, True),  # Databricks Connect, serverless: the executors are elsewhere
    ("/Volumes/main/default/runs/x", "spark://10.0.0.1:7077", False),
    ("/dbfs/runs/x", "spark://10.0.0.1:7077", False),
    ("dbfs:/runs/x", None, False),
    ("/tmp/spark-mnist-run", "local-cluster[2,1,1024]", False),  # executors on this machine
    ("/tmp/spark-mnist-run", "local[2]", False),
])
def test_executor_ranks_need_a_shared_run_dir(run_dir, master, refused):
    from spark_mnist.errors import SourceError
    from spark_mnist.launch.torch_distributor import check_shared_run_dir

    if refused:
        with pytest.raises(SourceError, match=r"run_dir must be a path the executors share with the driver .*"
                                              r"--no-local-mode.*/Volumes/") as e:
            check_shared_run_dir(run_dir, master)
        assert "\n" not in str(e.value)
    else:
        check_shared_run_dir(run_dir, master)


def test_no_local_mode_with_a_driver_local_run_dir_is_refused_before_launch(data, tmp_path, nothing_launches):
    from spark_mnist.errors import SourceError
    from spark_mnist.pipeline import train

    settings = load_settings(None, {"train": {"data": str(data), "run_dir": str(tmp_path / "run"),
                                              "local_mode": False, "converter": "none"}})
    with pytest.raises(SourceError, match=r"run_dir must be a path the executors share"):
        train(FakeSession("spark://10.0.0.1:7077"), settings)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def stand_in_air(monkeypatch):
    """An importable ``databricks.air`` (the launcher's package check only)."""
    monkeypatch.setitem(sys.modules, "databricks.air", types.ModuleType("databricks.air"))


def test_a_serverless_run_across_nodes_is_refused(data, tmp_path, stand_in_air, nothing_launches, capsys):
    assert main(["train", "--data", str(data), "--run-dir", str(tmp_path / "run"), "--launcher", "ai-runtime",
                 "--remote-gpu", "--accelerator-type", "GPU_8xH100", "--accelerator-count", "16"]) == 2
    line = one_error_line(capsys)
    assert "16 accelerators of GPU_8xH100 span 2 nodes of 8 GPU(s)" in line and "not supported yet" in line
    assert not (tmp_path / "run").exists()


def test_one_serverless_node_is_accepted(stand_in_air):
    from spark_mnist.launch import check

    for kind, count in (("GPU_8xH100", 8), ("GPU_1xA10", 1), ("GPU_8xB300", 2)):
        settings = load_settings(None, {"train": {"launcher": "ai-runtime", "remote_gpu": True,
                                                  "accelerator_type": kind, "accelerator_count": count}}).train
        check(settings)
    settings = load_settings(None, {"train": {"launcher": "ai-runtime", "remote_gpu": True,
                                              "accelerator_type": "GPU_1xA10", "accelerator_count": 2}}).train
    with pytest.raises(LauncherUnavailableError, match="span 2 nodes of 1 GPU"):
        check(settings)
