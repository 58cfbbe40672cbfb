"""spark-mnist: gz IDX files -> Spark -> Parquet shards -> a rank-aware PyTorch DDP loader, for Databricks.

The modules read as the pipeline: ``idx`` (parse) and ``datasets`` (registry) -> ``sources``/``storage`` (bytes and
paths) -> ``ingest`` (driver: Parquet shards, ``contract``) -> ``loader`` (every rank) -> ``model``/``train`` (every
rank) -> ``session`` (driver: the Spark session) -> ``launch`` (driver: petastorm converter, TorchDistributor) ->
``cli``.

``spark_mnist.load_data(path)`` gives Keras-style numpy arrays (see :mod:`spark_mnist.tools.arrays`).
"""

__version__ = "0.1.0"


def load_data(path, dataset: str = "mnist"):
    """Keras-style ``((x_train, y_train), (x_test, y_test))``; see :func:`spark_mnist.tools.arrays.load_data`."""
    from spark_mnist.tools.arrays import load_data as _load_data

    return _load_data(path, dataset)
