"""Spark's Python worker daemon, for the local-mode sessions :func:`spark_mnist.driver.session.spark_session` starts
(``spark.python.daemon.module``): Spark's own ``pyspark.daemon`` with the Spark archives taken off ``sys.path``.

Why: Spark puts its core jar and ``SPARK_HOME/python/lib``'s ``pyspark.zip`` and ``py4j-*-src.zip`` on the Python
workers' ``PYTHONPATH``, and every Python task starts with ``importlib.invalidate_caches()``.  On Python 3.10 and
3.11 that re-reads the central directory of every zip archive on the path, in pure Python (CPython gh-103200, fixed
in 3.12): measured here, ~0.1 s per task for the 5,000-entry jar (which holds no Python at all) and ~0.05 s for
``pyspark.zip``.  Ingest's write job runs one Python task per shard, so this was a large share of its time.

The archives are dropped only where the installed ``pyspark`` and ``py4j`` packages (the ones the driver imported,
in the same interpreter) are importable without them, so the workers run exactly the same code.  Runs in every
Spark Python worker process, never in the driver.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys

# Packages the workers import from Spark's archives when those come first on the path.
SPARK_PYTHON_PACKAGES = ("pyspark", "py4j")


def spark_archives(path: list[str]) -> list[str]:
    """The entries of ``path`` that are Spark's archives and can go: every ``.jar``, and the ``.zip`` files named
    after :data:`SPARK_PYTHON_PACKAGES` (``pyspark.zip``, ``py4j-*-src.zip``) where those packages are importable
    from the rest of ``path``."""
    jars = [p for p in path if p.endswith(".jar")]
    zips = [p for p in path if p.endswith(".zip") and os.path.basename(p).startswith(SPARK_PYTHON_PACKAGES)]
    rest = [p for p in path if p not in jars and p not in zips]
    if all(importlib.machinery.PathFinder.find_spec(name, rest) is not None for name in SPARK_PYTHON_PACKAGES):
        return jars + zips
    return jars


def main() -> None:
    """Take Spark's archives off ``sys.path`` (and out of ``sys.path_importer_cache``), then run ``pyspark.daemon``."""
    for entry in spark_archives(sys.path):
        sys.path.remove(entry)
        sys.path_importer_cache.pop(entry, None)
    from pyspark import daemon

    daemon.manager()


if __name__ == "__main__":
    main()
