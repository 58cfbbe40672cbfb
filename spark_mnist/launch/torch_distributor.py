"""The ``torch-distributor`` launcher: pyspark's ``TorchDistributor`` on a Spark session.

The ranks run on the driver (``local_mode``, torchrun as a child process) or in Spark tasks on the executors (a
classic GPU cluster: one rank per GPU worker, ``spark.task.resource.gpu.amount: 1``).  The only module outside
``driver/`` that imports Spark.  ``TorchDistributor`` gives the ranks their GPUs through ``CUDA_VISIBLE_DEVICES``
(local mode: ``num_processes`` of the driver's; on executors: the task's), so a rank's ``LOCAL_RANK`` indexes the
devices it sees.  Source: Spark's ``ml/torch/distributor.py``.
"""

from typing import Any, Callable, cast

from spark_mnist.errors import SourceError
from spark_mnist.paths import normalize_uri, redact

__all__ = ["run", "check_shared_run_dir"]


def run(fn: Callable[[Any], dict[str, Any]], job: Any) -> dict[str, Any]:
    """``TorchDistributor(num_processes, local_mode, use_gpu).run(fn, job)`` on the active session (classic or
    Spark Connect: the pipeline starts one); rank 0's return value.  Raises what ``TorchDistributor.run`` raises
    when a rank fails."""
    from pyspark.ml.torch.distributor import TorchDistributor  # pyspark: torchrun and ai-runtime run without it

    t = job.settings
    # Distributed mode: torch's elastic agents wait for each other at their exit barrier, up to a fixed 300 s
    # (torch distributed/elastic/agent/server/api.py, SimpleElasticAgent._exit_barrier; pytorch/pytorch#157318),
    # so train_worker ends with a dist.barrier(): every rank's process exits together (docs: Launchers).
    distributor = TorchDistributor(num_processes=t.num_processes, local_mode=t.local_mode, use_gpu=t.use_gpu)
    return cast(dict[str, Any], distributor.run(fn, job))  # fn's return value, which pyspark types as Any


def check_shared_run_dir(run_dir: str | None, master: str | None) -> None:
    """Refuse a run directory the executors' ranks cannot share with the driver: with ``local_mode`` off, rank 0
    writes the model, checkpoint and metrics on its executor and the driver reads them, so ``run_dir`` must be a
    shared path (``/dbfs/...``, ``dbfs:/...``, ``/Volumes/...``).  A ``local``/``local-cluster`` master (executors on
    this machine) accepts any path; ``master`` is :func:`spark_mnist.driver.session.master_here`'s, ``None`` where
    the executors are not on this machine's side (Databricks Connect, serverless).  The pipeline calls it with the
    session's master before anything launches.

    Raises:
        SourceError: a run directory on the driver's own disk (``/tmp/...``, a relative path) with executors
            elsewhere; one line naming it and the fix.
    """
    # dbfs and volume: where a path is the same on the driver and every executor of a Databricks cluster (FUSE).
    if run_dir is None or (master or "").startswith("local") or normalize_uri(run_dir).kind in ("dbfs", "volume"):
        return
    where = redact(master) if master else "not on this machine"
    raise SourceError(
        f"{redact(run_dir)}: run_dir must be a path the executors share with the driver when the ranks "
        f"run on the executors (--no-local-mode, master {where}): use /Volumes/<catalog>/<schema>/"
        f"<volume>/... or /dbfs/..., or train on the driver with --local-mode"
    )
