"""Databricks ``spark_python_task``: DDP training, by default with TorchDistributor (GPU, ranks in executors).

Parameters are those of ``spark-mnist train`` (``--data``, ``--epochs``, ``--batch-size``, ``--num-processes``,
``--lr``, ``--seed``, ``--resume``, ``--launcher``, ``--config``); defaults come from conf/databricks.yaml
(``auto_resume``: a retried task continues from the run directory's checkpoint).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _entry import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("train", sys.argv[1:]))
