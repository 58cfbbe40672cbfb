"""Shared by the Databricks job entry points: run one ``spark-mnist`` subcommand with conf/databricks.yaml."""

from __future__ import annotations

import os
import sys
from typing import Sequence

from spark_mnist.cli import main

DATABRICKS_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf",
                                 "databricks.yaml")


def run(command: str, argv: Sequence[str]) -> int:
    """``spark-mnist COMMAND ARGV...``, with ``--config conf/databricks.yaml`` unless ARGV names a config."""
    args = list(argv)
    if "--config" not in args and os.path.exists(DATABRICKS_CONFIG):
        args = ["--config", DATABRICKS_CONFIG, *args]
    return main([command, *args])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(sys.argv[1], sys.argv[2:]))
