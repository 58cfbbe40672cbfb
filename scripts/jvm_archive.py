"""What ``make test``'s JVM class archive holds: run by ``spark-submit`` with ``-XX:ArchiveClassesAtExit`` (Makefile,
``JVM_ARCHIVE``), it starts a local session, writes and reads a little Parquet and runs a Python worker, as the tests' sessions do, so that
the classes those load are in the archive the tests' JVMs start from."""

import sys
import tempfile

from pyspark.sql import SparkSession

spark = SparkSession.builder.master("local[2]").appName("jvm-archive").getOrCreate()
with tempfile.TemporaryDirectory() as scratch:
    spark.createDataFrame([(i, bytes([i % 256])) for i in range(1000)], "id long, data binary").write.parquet(
        f"{scratch}/rows"
    )
    rows = spark.read.parquet(f"{scratch}/rows").rdd.map(lambda row: row.id).count()  # a Python worker too
spark.stop()
sys.exit(0 if rows == 1000 else 1)
