"""Fixes to ``spark_mnist/loader.py`` that the loader benchmark found, as a benchmark-only patch so that their effect
is measured next to the unpatched loader (row ``ours_proposed`` of ``bench_loader``).  Not used by the package.

1. Cold epoch: ``_decode_group`` turns the ``index`` and ``label`` columns into numpy with
   ``ChunkedArray.to_numpy()``, which in pyarrow 14 imports pandas the first time (0.35 - 0.7 s on a 2-core machine,
   more than reading and decoding the whole 60,000-row split).  A training rank does not import pandas otherwise.
   Fix: read fixed-width columns straight from their Arrow buffers (:func:`fixed_width_column`), as
   ``decode_images`` already does for the pixels.
2. Warm epochs: ``ShardLoader._gather`` copies each batch with ``torch.index_select``, which runs on torch's
   intra-op (OpenMP) thread pool once a batch exceeds its grain size (256 x 784 bytes does).  When the ranks'
   threads outnumber free cores (2 torch threads on a 2-core machine that is doing anything else, or several ranks
   per host) each 200 KB copy waits at an OpenMP barrier: warm epochs measured 0.06 - 1.9 s instead of 0.015 s.
   Fix: gather with ``numpy.take`` (single-threaded memcpy per row, no thread pool) into the output tensor's
   buffer (:meth:`ProposedShardLoader._gather`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from spark_mnist import contract
from spark_mnist import loader as spark_mnist_loader
from spark_mnist.errors import DatasetMismatchError

_NUMPY_INTS = {"int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64}


def fixed_width_column(column, path: str = "<parquet>") -> np.ndarray:
    """An integer Arrow column (Array or ChunkedArray) as numpy, from its values buffers: no pandas import, no
    copy for a single chunk.

    Raises:
        DatasetMismatchError: nulls, or a type other than a signed integer.
    """
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    dtype = _NUMPY_INTS.get(str(column.type))
    if dtype is None:
        raise DatasetMismatchError(f"{path}: column of type {column.type}: expected a signed integer")
    parts = []
    for chunk in chunks:
        if chunk.null_count:
            raise DatasetMismatchError(f"{path}: {chunk.null_count} nulls in an integer column")
        if len(chunk):
            parts.append(np.frombuffer(chunk.buffers()[1], dtype=dtype)[chunk.offset:chunk.offset + len(chunk)])
    if not parts:
        return np.empty(0, dtype=dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def decode_group(group, row_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``spark_mnist.loader._decode_group`` without ``to_numpy`` (fix 1)."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(group.path) as f:
        table = f.read_row_group(group.row_group, columns=list(contract.COLUMNS))
    index = fixed_width_column(table.column(contract.INDEX), group.path).astype(np.int64, copy=False)
    labels = fixed_width_column(table.column(contract.LABEL), group.path).astype(np.int64)
    images = spark_mnist_loader.decode_images(table.column(contract.IMAGE), row_bytes, group.path)
    return index, images, labels


class ProposedShardLoader(spark_mnist_loader.ShardLoader):
    """:class:`spark_mnist.loader.ShardLoader` with fix 2; use inside :func:`patched` for fix 1."""

    def _gather(self, tensors, positions):
        import torch

        index, images, labels = tensors
        out = torch.empty((len(positions), 1, *self.image_shape), dtype=torch.uint8, pin_memory=self.pin_memory)
        np.take(images.numpy(), positions.numpy(), axis=0, out=out.numpy())
        return index[positions], out, labels[positions]


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """Route ``spark_mnist.loader``'s row-group decoding through :func:`decode_group` (fix 1) while open."""
    original = spark_mnist_loader._decode_group
    spark_mnist_loader._decode_group = decode_group
    try:
        yield
    finally:
        spark_mnist_loader._decode_group = original
