# Databricks notebook source
# MAGIC %md
# MAGIC # Ingest an MNIST-family dataset into a Unity Catalog volume
# MAGIC
# MAGIC Reads the four gz IDX files under `<volume>/raw/<dataset>`, checks every file, and writes Parquet shards and
# MAGIC their manifest to `<volume>/parquet/<dataset>`. Runs on any compute, serverless CPU included.
# MAGIC Requirements: the spark-mnist wheel on a volume (README, "Install"), and the four files uploaded
# MAGIC (`spark-mnist download mnist --to DIR` fetches them, verified).

# COMMAND ----------

# MAGIC %pip install /Volumes/main/default/mnist/wheels/spark_mnist-0.2.0-py3-none-any.whl

# COMMAND ----------

dbutils.widgets.text("volume", "/Volumes/main/default/mnist")
dbutils.widgets.text("dataset", "mnist")
volume = dbutils.widgets.get("volume")
dataset = dbutils.widgets.get("dataset")

# COMMAND ----------

import spark_mnist

manifest = spark_mnist.ingest(spark, f"{volume}/raw/{dataset}", f"{volume}/parquet/{dataset}", dataset=dataset)
print({split: info.rows for split, info in manifest.splits.items()})

# COMMAND ----------

# The dataset is what its manifest names: Spark reads it like any Parquet files.
dataset_files = spark_mnist.open_dataset(f"{volume}/parquet/{dataset}").files("test")
display(spark.read.parquet(*dataset_files).limit(5))
