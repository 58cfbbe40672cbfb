"""launch.run_with_restarts and the one failure channel, without starting ranks: which attempt resumes, what is relaunched,
what a failed launch reads like."""

from __future__ import annotations

import json
import logging
import os
import time
from types import SimpleNamespace

import pytest

from spark_mnist.config import TrainSettings
from spark_mnist.job import TrainJob
from spark_mnist.launch import TrainingFailedError, launch, run_with_restarts


def restarted(monkeypatch, run_dir, attempt, *, max_restarts, resume):
    """run_with_restarts with ``attempt(resume)`` in place of each launch, on a job whose run directory is
    ``run_dir`` (its checkpoint: ``run_dir/checkpoint.pt``)."""
    monkeypatch.setattr("spark_mnist.launch.launch", lambda fn, job: attempt(job.settings.resume))
    job = TrainJob(TrainSettings(max_restarts=max_restarts), [], [], "mnist", 10, (28, 28), str(run_dir))
    return run_with_restarts(lambda job: None, job, resume=resume)


def failing(*errors):
    """An attempt that raises ``errors`` in turn, then returns metrics; records the ``resume`` of each call."""
    calls = []

    def attempt(resume):
        calls.append(resume)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return {"test_accuracy": 0.5}

    return attempt, calls


def lost(message="rank 1 killed") -> TrainingFailedError:
    return TrainingFailedError.from_reports([], RuntimeError(message))


def test_a_fresh_run_resumes_only_from_a_checkpoint_it_wrote(tmp_path, caplog, monkeypatch):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"an earlier run's")
    attempt, calls = failing(lost())
    caplog.set_level(logging.WARNING, logger="spark_mnist")
    metrics = restarted(monkeypatch, tmp_path, attempt, max_restarts=1, resume=False)
    assert calls == [False, False] and metrics["restarts"] == 1
    assert "restart 1/1 from the start (no checkpoint yet) after: training failed and no rank left" in caplog.text

    def writes_then_fails(resume, calls=[]):
        calls.append(resume)
        if len(calls) == 1:
            time.sleep(0.01)
            checkpoint.write_bytes(b"this run's, a bit longer")
            raise lost()
        return {"calls": list(calls)}

    assert restarted(monkeypatch, tmp_path, writes_then_fails, max_restarts=2, resume=False)["calls"] == [False, True]


def test_restarts_stop_at_max_restarts_and_at_bad_input(tmp_path, monkeypatch):
    import spark_mnist.rank.checkpoint  # noqa: F401 - defines CheckpointError, an InputError (the pipeline imports it)

    attempt, calls = failing(lost("a"), lost("b"), lost("c"))
    with pytest.raises(TrainingFailedError, match="b"):
        restarted(monkeypatch, tmp_path, attempt, max_restarts=1, resume=True)
    assert calls == [True, True]
    bad = TrainingFailedError.from_reports([{"rank": 0, "exception": "CheckpointError: other seed", "traceback": []},
                                            {"rank": 1, "exception": "CheckpointError: other seed",
                                             "traceback": []}], RuntimeError("x"))
    attempt, calls = failing(bad)
    with pytest.raises(TrainingFailedError, match="CheckpointError"):
        restarted(monkeypatch, tmp_path, attempt, max_restarts=3, resume=True)
    assert calls == [True], "bad input fails the same way again: no relaunch"


def broken(report_rank=None):
    """A launcher's ``run`` whose rank ``report_rank`` leaves a report (as rank.train does), then fails."""

    def run(fn, job):
        if report_rank is not None:
            errors = os.path.join(job.run_dir, "_errors")
            os.makedirs(errors, exist_ok=True)
            with open(os.path.join(errors, f"rank-{report_rank}.json"), "w") as f:
                json.dump({"rank": report_rank, "exception": "ValueError: bad batch",
                           "traceback": ["Traceback\n", "ValueError: bad batch\n"]}, f)
        raise RuntimeError("the launcher's own error")

    return run


def job(run_dir):
    """What launch reads of a TrainJob: its settings (the launcher) and run directory."""
    from spark_mnist.config import TrainSettings

    return SimpleNamespace(settings=TrainSettings(launcher="torchrun"), run_dir=str(run_dir))


def test_a_failed_launch_reads_the_ranks_reports_and_clears_old_ones(tmp_path, monkeypatch):
    monkeypatch.setattr("spark_mnist.launch.run_torchrun", broken(report_rank=1))
    stale = tmp_path / "_errors"
    stale.mkdir()
    (stale / "rank-0.json").write_text(json.dumps({"rank": 0, "exception": "OldError: x", "traceback": []}))
    with pytest.raises(TrainingFailedError, match=r"rank 1 failed: ValueError: bad batch") as info:
        launch(lambda job: None, job(tmp_path))
    assert isinstance(info.value.__cause__, RuntimeError) and "OldError" not in str(info.value)
    assert info.value.exceptions == ["ValueError: bad batch"]


def test_a_launch_without_reports_says_no_rank_left_one(tmp_path, monkeypatch):
    monkeypatch.setattr("spark_mnist.launch.run_torchrun", broken())
    with pytest.raises(TrainingFailedError, match="no rank left an error report.*the launcher's own error"):
        launch(lambda job: None, job(tmp_path))


def test_auto_resume_continues_from_a_matching_checkpoint_and_says_so(tmp_path, caplog):
    """A retried job (auto_resume): the run directory's checkpoint is resumed from by the rule an explicit resume
    refuses by (elastic world size included); one of another run is left, in one line, for a fresh start."""
    from spark_mnist.config import load_settings
    from spark_mnist.errors import LoaderStateError
    from spark_mnist.pipeline import check_resume
    from spark_mnist.rank.checkpoint import Checkpoint, save_checkpoint

    loader = {"seed": 1, "epoch": 1, "step": 3, "samples": 192, "world_size": 2, "batch_size": 32,
              "global_batch_size": 64, "rows": 640, "shuffle": True, "drop_remainder": True,
              "dataset": "generation:g1"}
    save_checkpoint(Checkpoint(model={}, optimizer={}, loader=loader), str(tmp_path))

    def resumes(generation="g1", **train):
        values = {"run_dir": str(tmp_path), "num_processes": 2, "batch_size": 32, "seed": 1, "auto_resume": True,
                  **train}
        manifest = SimpleNamespace(generation=generation, splits={"train": SimpleNamespace(rows=640)})
        return check_resume(load_settings(None, {"train": values}), manifest)

    caplog.set_level(logging.INFO, logger="spark_mnist")
    assert resumes() is True
    assert "resume: continuing from" in caplog.text and "(epoch 2, step 3)" in caplog.text
    for other, said in (({"seed": 7}, "the seed is 1 in"), ({"generation": "g2"}, "the dataset is 'generation:g1'"),
                        ({"batch_size": 16}, "the global batch size is 64"),
                        ({"num_processes": 3}, "does not split over 3 ranks")):
        caplog.clear()
        assert resumes(**other) is False
        assert "resume: starting afresh: Cannot resume: " in caplog.text and said in caplog.text
        with pytest.raises(LoaderStateError, match=said):
            resumes(**other, resume=True)  # the same check, refused with --resume
    assert resumes(num_processes=4, batch_size=16) is True  # the same global batch on 4 ranks
    assert resumes(num_processes=4) is True  # elastic: the checkpoint's global batch over 4 ranks
    caplog.clear()
    assert resumes(run_dir=str(tmp_path / "none")) is False and "no checkpoint in" in caplog.text
