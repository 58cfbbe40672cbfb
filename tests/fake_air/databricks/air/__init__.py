"""A stand-in for ``databricks.air`` (databricks-sdk-air 0.1.1) at the import boundary, for CPU machines.

Put ``tests/fake_air`` first on ``sys.path`` (``PYTHONPATH``): ``import databricks.air`` then finds this package
(``databricks`` is a pkgutil namespace, so databricks-sdk's ``databricks.sdk`` still imports).  ``distributed`` has
the real decorator's signature (tests/test_launch.py binds against the real one where the package is installed) and
runs the function as the real local mode does: one process per accelerator with torchrun's environment (here
through torch's ``elastic_launch`` on CPU, gloo), returning the ranks' values as a list by rank.  ``remote=True``
runs locally too.  Nothing of spark-mnist is patched.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Optional

__version__ = "0.1.1+fake"
CALLS: list[dict[str, Any]] = []  # the decorator's arguments, for the test process that imports this module


class DistributedFunction:
    def __init__(self, func: Callable, num_accelerators: int, accelerator_type: Optional[str], remote: bool):
        self.func, self.gpus, self.accelerator_type, self.remote = func, num_accelerators, accelerator_type, remote

    def __call__(self, *args: Any, **kwargs: Any):
        raise RuntimeError(f"call {self.func.__name__}.distributed(...)")

    def distributed(self, *args: Any, **kwargs: Any) -> list[Any]:
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=self.gpus, run_id=uuid.uuid4().hex[:8],
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              start_method="spawn")
        if kwargs:
            raise TypeError("this stand-in passes positional arguments only")
        outputs = elastic_launch(config, self.func)(*args)
        return [outputs[rank] for rank in sorted(outputs)]


def distributed(num_accelerators: Optional[int] = None, accelerator_type: Optional[str] = None, remote: bool = False,
                timeout: Optional[float] = 10800, *, gpus: Optional[int] = None, gpu_type: Optional[str] = None):
    CALLS.append({"num_accelerators": num_accelerators, "accelerator_type": accelerator_type, "remote": remote})

    def decorator(func: Callable) -> DistributedFunction:
        return DistributedFunction(func, num_accelerators or 1, accelerator_type, remote)

    return decorator
