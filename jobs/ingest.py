"""Databricks ``spark_python_task``: gz IDX files in a volume or DBFS -> Parquet shards.

Parameters are those of ``spark-mnist ingest`` (``--source``, ``--output``, ``--dataset``, ``--num-shards``,
``--strict``, ``--config``); defaults come from conf/databricks.yaml.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _entry import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("ingest", sys.argv[1:]))
