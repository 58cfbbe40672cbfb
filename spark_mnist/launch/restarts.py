"""Relaunching training from the last checkpoint when a rank dies or raises (``train.max_restarts``).

Every launcher is relaunched the same way, around one launch (:func:`run_with_restarts`): a failed attempt
(:class:`~spark_mnist.launch.TrainingFailedError`) is logged with its cause and relaunched, at most
``max_restarts`` times, resuming from the run directory's checkpoint when this run wrote one (a checkpoint that was
there before a fresh run started is not this run's and is not resumed from).  A failure that is bad input (every
rank's report is an :class:`~spark_mnist.errors.InputError`, e.g. a checkpoint of another run) would fail the same
way again and is not relaunched.  torchelastic's ``max_restarts`` and Spark's task retries restart a worker group
from its start; this restarts it from where the last checkpoint stands.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable

from spark_mnist.errors import InputError
from spark_mnist.launch import TrainingFailedError

__all__ = ["is_bad_input", "run_with_restarts"]

log = logging.getLogger(__name__)


def _stat(path: str) -> tuple[int, int] | None:
    with contextlib.suppress(OSError):
        st = os.stat(path)
        return st.st_mtime_ns, st.st_size
    return None


def _names(cls: type) -> set[str]:
    """The names of ``cls`` and its subclasses, at any depth."""
    return {cls.__name__}.union(*map(_names, cls.__subclasses__()))


def is_bad_input(error: TrainingFailedError) -> bool:
    """Whether every rank reported an :class:`~spark_mnist.errors.InputError` (by type name): a relaunch would
    fail the same way."""
    names = _names(InputError)
    return bool(error.exceptions) and all(e.split(":", 1)[0] in names for e in error.exceptions)


def run_with_restarts(
    attempt: Callable[[bool], dict[str, Any]], *, max_restarts: int, checkpoint: str, resume: bool
) -> dict[str, Any]:
    """``attempt(resume)`` (one launch), relaunched after a failure at most ``max_restarts`` times.

    Args:
        attempt: runs the ranks once; ``True`` resumes from ``checkpoint``.  Returns rank 0's metrics, raises
            :class:`TrainingFailedError` when a rank fails.
        max_restarts: relaunches allowed (``train.max_restarts``); 0: none.
        checkpoint: the run directory's checkpoint file.
        resume: whether the run resumes (``--resume`` or ``resume: auto``); a fresh run resumes after a failure
            only from a checkpoint it wrote itself.
    Returns:
        The metrics of the attempt that finished, with ``restarts`` (relaunches it took).
    Raises:
        TrainingFailedError: the last attempt's failure, or a bad-input failure at once.
    """
    before, restarts = _stat(checkpoint), 0
    while True:
        try:
            return {**attempt(resume), "restarts": restarts}
        except TrainingFailedError as e:
            cause = str(e).splitlines()[0]
            if restarts >= max_restarts or is_bad_input(e):
                if restarts:
                    log.warning("training failed after %d restart(s) of %d: %s", restarts, max_restarts, cause)
                raise
            restarts += 1
            resume = resume or _stat(checkpoint) != before
            where = f"from the last checkpoint, {checkpoint}" if resume else "from the start (no checkpoint yet)"
            log.warning("restart %d/%d %s after: %s", restarts, max_restarts, where, cause)
