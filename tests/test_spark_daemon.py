"""The Python worker daemon of local sessions: Spark's archives off the workers' path, the same pyspark imported."""

from __future__ import annotations

import os
import sys

import pyspark

from spark_mnist.tasks.spark_daemon import spark_archives

SITE = os.path.dirname(os.path.dirname(pyspark.__file__))  # where the installed pyspark (and py4j) live


def test_jars_always_go_and_spark_zips_go_where_the_packages_are_installed():
    lib = os.path.join(SITE, "pyspark", "python", "lib")
    path = [os.path.join(lib, "pyspark.zip"), os.path.join(lib, "py4j-0.10.9.7-src.zip"),
            os.path.join(SITE, "pyspark", "jars", "spark-core_2.12-3.5.9.jar"), "/opt/other.zip", SITE]
    assert spark_archives(path) == path[2:3] + path[:2]


def test_spark_zips_stay_where_they_are_the_only_pyspark():
    path = ["/spark/python/lib/pyspark.zip", "/spark/python/lib/py4j-0.10.9.7-src.zip", "/spark/jars/core.jar",
            "/nowhere"]
    assert spark_archives(path) == ["/spark/jars/core.jar"]


def test_local_session_workers_run_without_spark_archives(spark):
    def worker_facts(_):
        import pyspark as worker_pyspark

        return [p for p in sys.path if p.endswith((".jar", ".zip")) and os.path.exists(p)], worker_pyspark.__file__

    archives, pyspark_file = spark.sparkContext.parallelize([0], 1).map(worker_facts).collect()[0]
    assert archives == []
    assert pyspark_file == pyspark.__file__  # the driver's own pyspark, not a copy from an archive
