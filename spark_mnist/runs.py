"""The run directory's contract: what training leaves in it, and the one channel through which a rank's failure
reaches the launcher; written by the ranks, read by the launchers and the tools.  See docs/concepts/launchers.md.

A run directory (``train.run_dir``) holds::

    model.pt             rank 0, at the end: the model's ``state_dict``
    metrics.json         rank 0, at the end: the run's metrics (what the per-rank function returns)
    checkpoint.pt        rank 0, during the run: where it stands (:mod:`spark_mnist.rank.checkpoint`)
    curves.png           the launcher's picture of the metrics' history (:mod:`spark_mnist.tools.plots`)
    _errors/rank-N.json  a failed rank's report (:func:`write_error_report`)

One failure channel: a failing rank writes its report atomically (:func:`write_error_report`); the launcher turns
whatever it caught into one :class:`TrainingFailedError` with :func:`failure`, which reads the reports and never
raises.

Importable anywhere: no torch, no Spark.
"""

import json
import logging
import os
import pathlib
import re
import shutil
import traceback
from typing import Any, Sequence

from spark_mnist.fs import replacing
from spark_mnist.paths import redact

__all__ = ["MODEL_NAME", "METRICS_NAME", "CHECKPOINT_NAME", "CURVES_NAME", "ERRORS_DIR", "TRACEBACK_LINES", "failure",
           "TrainingFailedError", "write_error_report", "clear_error_reports", "dataset_identity"]  # fmt: skip

log = logging.getLogger(__name__)

MODEL_NAME = "model.pt"
METRICS_NAME = "metrics.json"
CHECKPOINT_NAME = "checkpoint.pt"
CURVES_NAME = "curves.png"
ERRORS_DIR = "_errors"
TRACEBACK_LINES = 12
_REPORT_TYPES = {"rank": int, "exception": str, "traceback": list}  # a readable report's entries


class TrainingFailedError(RuntimeError):
    """Training failed.  The message names the first failed rank, its exception and its traceback's tail (or says
    that no rank left a report); ``reports`` holds the readable reports, by rank; ``cause`` is what the launcher
    caught."""

    def __init__(self, message: str, reports: list[dict[str, Any]] | None = None, cause: BaseException | None = None):
        super().__init__(message)
        self.reports, self.cause = list(reports or []), cause

    @property
    def summary(self) -> str:
        """Which rank failed and how, in one line (the message's first), for a log line per restart."""
        return str(self).splitlines()[0] if str(self) else type(self).__name__

    @property
    def exceptions(self) -> list[str]:
        """``"Type: message"`` of each readable report, by rank (empty when no rank left one)."""
        return [str(r["exception"]) for r in self.reports]

    @classmethod
    def from_reports(
        cls, reports: list[dict[str, Any]], error: BaseException, skipped: Sequence[str] = ()
    ) -> "TrainingFailedError":
        """The error of a failed launch: the first report's rank, exception and traceback tail, and the other
        reports' exceptions; without reports (a rank killed by a signal or out of memory), ``error`` itself.
        ``skipped`` names the unreadable reports, which the message mentions.  Never raises."""
        note = f" ({len(skipped)} unreadable report(s) skipped: {', '.join(skipped)})" if skipped else ""
        if not reports:
            lost = "training failed and no rank left an error report (killed by a signal, out of memory?): "
            return cls(redact(f"{lost}{_describe(error)}{note}"), cause=error)
        first, others = reports[0], "".join(f"; rank {r['rank']}: {r['exception']}" for r in reports[1:])
        tail = "".join(first["traceback"]).rstrip()
        return cls(redact(f"rank {first['rank']} failed: {first['exception']}{others}{note}\n{tail}"), reports, error)


def failure(run_dir: str, error: BaseException) -> TrainingFailedError:
    """The :class:`TrainingFailedError` for ``error``, which a launcher caught while the ranks ran, with the reports
    :func:`write_error_report` left in ``run_dir/_errors``, sorted by integer rank (``rank-2`` before ``rank-10``).
    Never raises: a directory that cannot be listed leaves the message as ``error`` alone gives it, with a warning;
    an unreadable report (truncated, not JSON, missing entries) is skipped with a warning and named in the message.
    Driver-side.

    Use: ``except Exception as e: raise runs.failure(run_dir, e) from e``.
    """
    directory, names, reports, skipped = os.path.join(run_dir, ERRORS_DIR), [], [], []
    try:
        names = os.listdir(directory) if os.path.isdir(directory) else []
    except OSError as e:  # the failure must surface whatever the reports hold
        log.warning("could not read the ranks' error reports in %s: %s", run_dir, _describe(e))
    for _, name in sorted((int(m.group(1)), name) for name in names if (m := re.fullmatch(r"rank-(\d+)\.json", name))):
        path = os.path.join(directory, name)
        try:
            report = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
            if not (isinstance(report, dict) and all(isinstance(report.get(k), t) for k, t in _REPORT_TYPES.items())):
                raise ValueError("expected a JSON object with rank, exception and traceback")
            reports.append(report)
        except Exception as e:  # noqa: BLE001 - skipped, whatever broke it: the failure must surface
            log.warning("skipping the unreadable error report %s: %s", path, _describe(e))
            skipped.append(name)
    return TrainingFailedError.from_reports(reports, error, skipped)


def _describe(error: BaseException) -> str:
    """``"Type: message"``, or the type alone when the message is empty or cannot be made."""
    try:
        text = str(error)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error
        text = ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def write_error_report(run_dir: str, rank: int, error: BaseException) -> None:
    """Leave ``run_dir/_errors/rank-N.json`` for the launcher: ``rank`` (int), ``exception`` ("Type: message") and
    ``traceback`` (its last :data:`TRACEBACK_LINES` lines), written atomically (:func:`spark_mnist.fs.replacing`),
    so a reader never sees half a report.  Runs in a failing rank; never raises (the original error matters more
    than its report): a report that cannot be written is logged as an error, with the reason."""
    path = os.path.join(run_dir, ERRORS_DIR, f"rank-{rank}.json")
    try:
        lines = [redact(line) for line in traceback.format_exception(type(error), error, error.__traceback__)]
        report = {"rank": rank, "exception": redact(_describe(error)), "traceback": lines[-TRACEBACK_LINES:]}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f)
    except Exception as e:  # noqa: BLE001 - logged, not raised: the rank's own error is re-raised by its caller
        why, was = _describe(e), _describe(error)
        log.error("rank %s could not write its error report %s (%s); its error was %s", rank, path, why, was)


def clear_error_reports(run_dir: str) -> None:
    """Remove earlier runs' reports from ``run_dir`` before a new run.  Driver-side."""
    shutil.rmtree(os.path.join(run_dir, ERRORS_DIR), ignore_errors=True)


def dataset_identity(manifest: Any) -> str:
    """The identity of an ingested dataset, which a checkpoint records so that resuming on other data is refused.

    Args:
        manifest: the dataset's manifest (:class:`spark_mnist.shards.contract.Manifest`).
    Returns:
        ``"generation:<g>"``: every ingest writes a generation of its own, which its manifest names.
    """
    return f"generation:{manifest.generation}"
