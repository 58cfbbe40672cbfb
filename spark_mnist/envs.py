"""Environment variables changed for a block and restored after it (Spark's ``ml/torch/distributor.py`` does the
same for the children it starts): nothing spark-mnist sets outlives the block that needed it."""

import contextlib
import os
from typing import Iterator, Mapping

__all__ = ["scoped_env"]


@contextlib.contextmanager
def scoped_env(values: Mapping[str, str], restore: tuple[str, ...] = ()) -> Iterator[None]:
    """``os.environ`` updated with ``values`` for the block, then, with the variables ``restore`` names, as it was
    (a variable that was unset is unset again), however the block ends."""
    previous = {key: os.environ.get(key) for key in (*values, *restore)}
    os.environ.update(values)
    try:
        yield
    finally:
        for key in (key for key, value in previous.items() if value is None):
            os.environ.pop(key, None)
        os.environ.update({key: value for key, value in previous.items() if value is not None})
