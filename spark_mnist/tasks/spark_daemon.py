"""Spark's Python worker daemon for the local sessions :func:`spark_mnist.driver.session.spark_session` starts
(``spark.python.daemon.module``): ``pyspark.daemon`` with Spark's archives taken off ``sys.path``, where the
installed ``pyspark`` and ``py4j`` make them redundant.  Runs in every Spark Python worker process, never in the
driver; why it exists: docs/development.md.
"""

import importlib.machinery
import os
import sys

__all__ = ["SPARK_PYTHON_PACKAGES", "spark_archives"]

# Packages the workers import from Spark's archives when those come first on the path.
SPARK_PYTHON_PACKAGES = ("pyspark", "py4j")


def spark_archives(path: list[str]) -> list[str]:
    """The entries of ``path`` that are Spark's archives and can go: every ``.jar``, and the ``.zip`` files named
    after :data:`SPARK_PYTHON_PACKAGES` (``pyspark.zip``, ``py4j-*-src.zip``) where those packages are importable
    from the rest of ``path``."""
    jars = [p for p in path if p.endswith(".jar")]
    zips = [p for p in path if p.endswith(".zip") and os.path.basename(p).startswith(SPARK_PYTHON_PACKAGES)]
    rest = [p for p in path if p not in jars and p not in zips]
    installed = all(importlib.machinery.PathFinder.find_spec(name, rest) is not None for name in SPARK_PYTHON_PACKAGES)
    return jars + zips if installed else jars


if __name__ == "__main__":  # Take Spark's archives off sys.path (and its importer cache), then run pyspark.daemon.
    for entry in spark_archives(sys.path):
        sys.path.remove(entry)
        sys.path_importer_cache.pop(entry, None)
    from pyspark import daemon  # after the archives are off sys.path: the installed pyspark

    daemon.manager()
