"""spark-mnist: gz IDX files -> Spark -> Parquet shards -> a rank-aware PyTorch DDP loader, for Databricks.

The folders read as the pipeline and say where code runs: ``formats`` (IDX parsing) and ``datasets`` (the registry)
-> ``driver`` (once, on the Spark driver: sources, ingest, commit, launch) -> ``shards`` (the Parquet contract,
anywhere) -> ``rank`` (every rank: world, loader, training loop) -> ``tools`` (verify, download, evaluate, plots,
tracking, load_data) -> ``cli``.  README's Architecture section names each module's job.

``spark_mnist.load_data(path)`` gives Keras-style numpy arrays (see :mod:`spark_mnist.tools.arrays`);
``spark_mnist.open_dataset(OUT)`` opens an ingested dataset through its manifest, the one way in for every reader
(``spark.read.parquet(*open_dataset(OUT).files("train"))``; see :mod:`spark_mnist.shards.contract`).
"""

__version__ = "0.1.0"


def load_data(path, dataset: str = "mnist"):
    """Keras-style ``((x_train, y_train), (x_test, y_test))``; see :func:`spark_mnist.tools.arrays.load_data`."""
    from spark_mnist.tools.arrays import load_data as _load_data

    return _load_data(path, dataset)


def open_dataset(path):
    """The dataset ingested at ``path``, opened through its manifest; see
    :func:`spark_mnist.shards.contract.open_dataset`."""
    from spark_mnist.shards.contract import open_dataset as _open_dataset

    return _open_dataset(path)
