# Databricks notebook source
# MAGIC %md
# MAGIC # Train on serverless GPU with the AI Runtime
# MAGIC
# MAGIC Requirements: a notebook attached to serverless GPU compute, the spark-mnist wheel with its `ai-runtime`
# MAGIC extra (`databricks-sdk-air`), and a dataset ingested by `01_ingest_to_volume`. `databricks.air` starts one
# MAGIC rank per attached GPU; there is no Spark on the GPU nodes: the ranks read the shards from the volume. From a
# MAGIC CPU notebook, set `remote_gpu` to `true` and name the `accelerator_type` to submit to serverless GPUs.

# COMMAND ----------

# MAGIC %pip install "/Volumes/main/default/mnist/wheels/spark_mnist-0.2.0-py3-none-any.whl[ai-runtime]"

# COMMAND ----------

dbutils.widgets.text("volume", "/Volumes/main/default/mnist")
dbutils.widgets.text("dataset", "mnist")
dbutils.widgets.text("accelerator_count", "1")
dbutils.widgets.dropdown("use_gpu", "true", ["true", "false"])
dbutils.widgets.dropdown("remote_gpu", "false", ["true", "false"])
dbutils.widgets.dropdown("accelerator_type", "GPU_1xA10", ["GPU_1xA10", "GPU_1xH100", "GPU_8xH100", "GPU_8xB300"])
dbutils.widgets.text("epochs", "5")
volume, dataset = dbutils.widgets.get("volume"), dbutils.widgets.get("dataset")

# COMMAND ----------

import spark_mnist

metrics = spark_mnist.train(f"{volume}/parquet/{dataset}", launcher="ai-runtime",
                            accelerator_count=int(dbutils.widgets.get("accelerator_count")),
                            use_gpu=dbutils.widgets.get("use_gpu") == "true",
                            remote_gpu=dbutils.widgets.get("remote_gpu") == "true",
                            accelerator_type=dbutils.widgets.get("accelerator_type"),
                            epochs=int(dbutils.widgets.get("epochs")),
                            run_dir=f"{volume}/runs/{dataset}-serverless")
print(f"test accuracy {metrics['test_accuracy']:.4f} on {metrics['world_size']} rank(s)")
