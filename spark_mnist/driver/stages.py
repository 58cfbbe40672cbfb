"""Where the time of a driver job goes: a clock of named, exclusive stages.  Driver-side; no Spark.

Ingest reports its own stages (reading the files through Spark, parsing headers and labels, decompressing the
images, the write job, the commit) through :class:`StageClock`, so a benchmark reads them rather than wrapping
ingest's functions.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


class StageClock:
    """Seconds per named stage, exclusive: a stage opened inside another counts only in itself, so the stages and
    the rest of the enclosing block (``other``, see :meth:`close`) add up to the block's wall time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._inner = [0.0]  # seconds of stages nested in the open one, one entry per open stage (and the block)
        self._started = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Count the block's wall time, minus the stages nested in it, under ``name``."""
        self._inner.append(0.0)
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - self._inner.pop()
            self._inner[-1] += elapsed

    def timed(self, name: str, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` with every call counted under ``name``."""

        def call(*args, **kwargs) -> T:
            with self.stage(name):
                return fn(*args, **kwargs)

        return call

    def close(self) -> dict[str, float]:
        """The stages so far plus ``other``, the time since the clock started that no stage counted (seconds)."""
        total = time.perf_counter() - self._started
        return {**self.seconds, "other": max(0.0, total - self._inner[0])}
