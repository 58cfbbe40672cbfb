"""The run directory's contract (spark_mnist.runs): one failure channel and the dataset's identity."""

from __future__ import annotations

import json
import logging

from spark_mnist import runs


def raised(error: BaseException) -> BaseException:
    """``error`` with a traceback, as a failing rank has it."""
    try:
        raise error
    except BaseException as e:  # noqa: BLE001 - the test wants the exception object
        return e


def test_reports_sort_by_integer_rank_and_a_truncated_one_is_skipped_with_a_note(tmp_path, caplog):
    run_dir = str(tmp_path)
    runs.write_error_report(run_dir, 10, raised(ValueError("ten")))
    runs.write_error_report(run_dir, 2, raised(RuntimeError("two")))
    errors = tmp_path / runs.ERRORS_DIR
    (errors / "rank-3.json").write_text('{"rank": 3, "exception": "Memo', encoding="utf-8")  # truncated
    (errors / ".rank-4.json.tmp-123").write_text("{", encoding="utf-8")  # a writer's temporary: not a report
    assert sorted(p.name for p in errors.iterdir()) == [".rank-4.json.tmp-123", "rank-10.json", "rank-2.json",
                                                        "rank-3.json"]
    caplog.set_level(logging.WARNING, logger="spark_mnist")
    failed = runs.failure(run_dir, RuntimeError("torchrun exited with code 1"))
    reports = failed.reports
    assert isinstance(failed, runs.TrainingFailedError) and [r["rank"] for r in reports] == [2, 10]
    assert reports[0]["exception"] == "RuntimeError: two" and "raise error" in "".join(reports[0]["traceback"])
    assert "skipping the unreadable error report" in caplog.text and "rank-3.json" in caplog.text
    assert failed.summary == ("rank 2 failed: RuntimeError: two; rank 10: ValueError: ten (1 unreadable report(s) "
                              "skipped: rank-3.json)")
    assert str(failed).splitlines()[-1] == "RuntimeError: two"  # the tail of rank 2's traceback


def test_failure_without_reports_names_the_launchers_error(tmp_path):
    failed = runs.failure(str(tmp_path), RuntimeError("exit code -9"))
    assert str(failed) == ("training failed and no rank left an error report (killed by a signal, out of memory?): "
                           "RuntimeError: exit code -9")
    assert failed.reports == [] and isinstance(failed.cause, RuntimeError)


def test_failure_never_raises_whatever_the_run_directory_holds(tmp_path):
    (tmp_path / runs.ERRORS_DIR).write_text("a file where the directory should be", encoding="utf-8")
    blocked = tmp_path / "blocked"
    (blocked / runs.ERRORS_DIR).mkdir(parents=True)
    (blocked / runs.ERRORS_DIR / "rank-0.json").write_text(json.dumps([1, 2]), encoding="utf-8")  # not a report

    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no message")

    for run_dir in (tmp_path, blocked, tmp_path / "missing"):
        failed = runs.failure(str(run_dir), Unprintable())
        assert failed.summary.startswith("training failed and no rank left an error report") and "Unprintable" in (
            failed.summary)


def test_a_report_that_cannot_be_written_is_logged_not_raised(tmp_path, caplog):
    (tmp_path / runs.ERRORS_DIR).write_text("a file where the directory should be", encoding="utf-8")
    caplog.set_level(logging.ERROR, logger="spark_mnist")
    runs.write_error_report(str(tmp_path), 1, raised(ValueError("lost")))
    assert "rank 1 could not write its error report" in caplog.text and "ValueError: lost" in caplog.text


def test_reports_are_written_whole_and_cleared(tmp_path):
    runs.write_error_report(str(tmp_path), 0, raised(KeyError("k")))
    assert [p.name for p in (tmp_path / runs.ERRORS_DIR).iterdir()] == ["rank-0.json"]  # no temporary left
    assert runs.failure(str(tmp_path), RuntimeError("x")).reports[0]["exception"] == "KeyError: 'k'"
    runs.clear_error_reports(str(tmp_path))
    assert runs.failure(str(tmp_path), RuntimeError("x")).reports == []


def test_dataset_identity_is_the_generation():
    class Manifest:  # the typed manifest names its generation
        generation = "g-0008"

    assert runs.dataset_identity(Manifest()) == "generation:g-0008"
