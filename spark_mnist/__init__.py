"""spark-mnist: gz IDX files -> Spark -> Parquet shards -> a rank-aware PyTorch DDP loader, for Databricks.

The modules read as the pipeline: ``idx`` (parse) and ``datasets`` (registry) -> ``sources``/``storage`` (bytes and
paths) -> ``ingest`` (driver: Parquet shards, ``contract``) -> ``loader`` (every rank) -> ``model``/``train`` (every
rank) -> ``launch`` (driver: Spark session, petastorm converter, TorchDistributor) -> ``cli``.
"""

__version__ = "0.1.0"
