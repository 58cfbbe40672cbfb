# Databricks notebook source
# MAGIC %md
# MAGIC # Train on a classic GPU cluster with TorchDistributor
# MAGIC
# MAGIC Requirements: a Databricks Runtime ML GPU cluster (15.4 LTS or newer) in dedicated access mode, the
# MAGIC spark-mnist wheel installed on it, and a dataset ingested by `01_ingest_to_volume`. One rank per GPU, run as
# MAGIC Spark tasks on the workers (`local_mode=False`); the run directory must be on the volume, where every
# MAGIC worker writes and the driver reads.

# COMMAND ----------

dbutils.widgets.text("volume", "/Volumes/main/default/mnist")
dbutils.widgets.text("dataset", "mnist")
dbutils.widgets.text("num_processes", "2")
dbutils.widgets.dropdown("use_gpu", "true", ["true", "false"])
dbutils.widgets.dropdown("local_mode", "false", ["true", "false"])
dbutils.widgets.text("epochs", "5")
volume, dataset = dbutils.widgets.get("volume"), dbutils.widgets.get("dataset")

# COMMAND ----------

import spark_mnist

metrics = spark_mnist.train(f"{volume}/parquet/{dataset}", launcher="torch-distributor", spark=spark,
                            num_processes=int(dbutils.widgets.get("num_processes")),
                            use_gpu=dbutils.widgets.get("use_gpu") == "true",
                            local_mode=dbutils.widgets.get("local_mode") == "true",
                            epochs=int(dbutils.widgets.get("epochs")),
                            run_dir=f"{volume}/runs/{dataset}")
print(f"test accuracy {metrics['test_accuracy']:.4f} in {metrics['train_seconds']:.0f} s; model: {metrics['model_path']}")
