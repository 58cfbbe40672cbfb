"""The session seam: the conf of the sessions spark-mnist starts, and the environment it leaves as it found it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from spark_mnist.config import SparkSettings
from spark_mnist.driver.session import LOCAL_SPARK_CONF, PYTHON_ENV, session_conf
from spark_mnist.envs import scoped_env
from tests.conftest import REPO

SESSION_SCRIPT = """
import json, os, sys
from spark_mnist.config import SparkSettings
from spark_mnist.driver.session import PYTHON_ENV, spark_session

with spark_session(SparkSettings(master="local[1]", app_name="spark-mnist-session-test",
                                 conf={"spark.driver.memory": "1g"})) as spark:
    inside = {key: os.environ.get(key) for key in PYTHON_ENV}
    worker = spark.range(1).rdd.map(lambda _: __import__("sys").executable).collect()[0]
    for user_file in ("artifacts/mnist/_manifest.json", "artifacts/run/model.pt"):  # a dataset, a run directory
        os.makedirs(os.path.dirname(user_file), exist_ok=True)
        open(user_file, "w").close()
after = {key: os.environ.get(key) for key in PYTHON_ENV}
artifacts = sorted(os.listdir("artifacts"))
print(json.dumps({"inside": inside, "worker": worker, "after": after, "python": sys.executable,
                  "artifacts": artifacts}))
"""


def test_session_conf_puts_the_settings_over_the_local_conf():
    conf = session_conf(SparkSettings(conf={"spark.sql.shuffle.partitions": "8",
                                            "spark.driver.extraJavaOptions": "-Dx=1"}))
    assert conf["spark.sql.shuffle.partitions"] == "8"
    assert conf["spark.python.daemon.module"] == LOCAL_SPARK_CONF["spark.python.daemon.module"]
    assert conf["spark.driver.extraJavaOptions"].startswith("-Dx=1 -Dlog4j2.configurationFile=")
    assert "spark.driver.extraJavaOptions" not in session_conf(SparkSettings(), verbose=True)


def test_scoped_env_restores_set_and_unset_variables(monkeypatch):
    monkeypatch.setenv("SPARK_MNIST_TEST_SET", "before")
    monkeypatch.delenv("SPARK_MNIST_TEST_UNSET", raising=False)
    with pytest.raises(RuntimeError):
        with scoped_env({"SPARK_MNIST_TEST_SET": "during", "SPARK_MNIST_TEST_UNSET": "during"}):
            assert os.environ["SPARK_MNIST_TEST_SET"] == os.environ["SPARK_MNIST_TEST_UNSET"] == "during"
            raise RuntimeError("the block fails")
    assert os.environ["SPARK_MNIST_TEST_SET"] == "before" and "SPARK_MNIST_TEST_UNSET" not in os.environ


@pytest.mark.slow
@pytest.mark.full  # session.py's own handling, in one lane: Spark 4.0.0's (SPARK-52396's ./artifacts)
def test_a_started_session_names_this_python_for_its_life_only(tmp_path):
    """The workers run this interpreter, and PYSPARK_PYTHON / PYSPARK_DRIVER_PYTHON are unset again afterwards; a
    dataset and a run directory written under ./artifacts during the session stay (SPARK-52396's clean-up takes
    only Spark's own folders)."""
    env = {k: v for k, v in os.environ.items() if k not in PYTHON_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", SESSION_SCRIPT], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["inside"] == {key: seen["python"] for key in PYTHON_ENV}
    assert seen["worker"] == seen["python"]
    assert seen["after"] == {key: None for key in PYTHON_ENV}
    assert seen["artifacts"] == ["mnist", "run"]


def test_spark_artifacts_removed_takes_only_the_spark_folders_made_meanwhile(tmp_path, monkeypatch):
    from spark_mnist.driver.session import spark_artifacts_removed

    (tmp_path / "work [1]").mkdir()  # a working directory whose name globs would misread
    monkeypatch.chdir(tmp_path / "work [1]")
    with spark_artifacts_removed():  # ./artifacts did not exist: Spark's folder and then the empty folder go
        os.makedirs("artifacts/spark-1234")
    assert not os.path.exists("artifacts")
    os.makedirs("artifacts/spark-earlier")  # another session's: not this one's to remove
    os.makedirs("artifacts/mnist")
    with spark_artifacts_removed():
        os.makedirs("artifacts/spark-5678")
        os.makedirs("artifacts/run")
    assert sorted(os.listdir("artifacts")) == ["mnist", "run", "spark-earlier"]
