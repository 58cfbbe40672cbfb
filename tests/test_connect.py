"""Spark Connect: the session seam (the one module that touches the JVM), how a session is resolved (Databricks
Connect faked at its import boundary), and the ingest over Connect writing the same dataset as the classic path."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from spark_mnist.config import SparkSettings, TrainSettings
from spark_mnist.driver import session
from spark_mnist.driver.converter import choose_converter
from spark_mnist.errors import EnvironmentMismatchError
from tests.conftest import REPO, requires_connect, write_dataset

# Attributes that reach the classic session's JVM or its broadcast variables: none of them outside the seam.
JVM_ATTRIBUTES = {"sparkContext", "_jvm", "_jsc", "_jdf", "_sc", "_jsparkSession", "broadcast"}
SEAM = REPO / "spark_mnist" / "driver" / "session.py"


def _jvm_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    uses = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute) and node.attr in JVM_ATTRIBUTES:
            name = node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value in JVM_ATTRIBUTES):
            name = node.args[1].value
        if name is not None:
            uses.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
    return uses


def test_nothing_outside_the_seam_touches_the_jvm():
    """sparkContext, _jvm, _jsc, _jdf and broadcast variables appear in driver/session.py only (the package, the
    Databricks jobs and the benchmarks), so everything else runs on a Spark Connect session."""
    files = [p for folder in ("spark_mnist", "jobs", "benchmarks") for p in sorted((REPO / folder).rglob("*.py"))]
    assert SEAM in files and len(files) > 30
    uses = [use for path in files if path != SEAM for use in _jvm_uses(path)]
    assert uses == []
    assert _jvm_uses(SEAM)  # the check sees them where they are


class FakeDatabricksSession:
    """Stands in for databricks.connect.DatabricksSession: ``builder.getOrCreate()`` gives a fake session."""

    created: list = []
    error: Exception | None = None

    class builder:  # noqa: N801 - the real API's spelling
        @staticmethod
        def getOrCreate():  # noqa: N802
            if FakeDatabricksSession.error is not None:
                raise FakeDatabricksSession.error
            fake = types.SimpleNamespace(stopped=False)
            fake.stop = lambda: setattr(fake, "stopped", True)
            FakeDatabricksSession.created.append(fake)
            return fake


@pytest.fixture
def fake_databricks_connect(monkeypatch):
    """``databricks.connect`` importable, with :class:`FakeDatabricksSession`; no active session, no SPARK_REMOTE."""
    from pyspark.sql import SparkSession

    package = types.ModuleType("databricks")
    module = types.ModuleType("databricks.connect")
    module.DatabricksSession = FakeDatabricksSession
    package.connect = module
    monkeypatch.setitem(sys.modules, "databricks", package)
    monkeypatch.setitem(sys.modules, "databricks.connect", module)
    monkeypatch.setattr(SparkSession, "getActiveSession", staticmethod(lambda: None))
    monkeypatch.delenv("SPARK_REMOTE", raising=False)
    FakeDatabricksSession.created, FakeDatabricksSession.error = [], None
    return FakeDatabricksSession


def test_databricks_connect_installed_gives_a_databricks_session(fake_databricks_connect):
    settings = SparkSettings(master=None)
    assert session.connect_expected(settings)
    with session.spark_session(settings) as spark:
        assert fake_databricks_connect.created == [spark] and not spark.stopped
    assert spark.stopped  # a session spark-mnist created is stopped on exit
    # its client-only pyspark cannot start a local master: the installed Databricks Connect wins over it
    with session.spark_session(SparkSettings(master="local[2]")) as spark:
        assert fake_databricks_connect.created[-1] is spark


def test_databricks_connect_not_configured_is_one_clear_error(fake_databricks_connect):
    fake_databricks_connect.error = ValueError("Cluster id or serverless are required but were not specified.")
    with pytest.raises(EnvironmentMismatchError, match=r"databricks-connect is installed but gave no session "
                                                       r"\(ValueError: Cluster id .*DATABRICKS_CLUSTER_ID.*--remote"):
        with session.spark_session(SparkSettings(master=None)):
            pass


def test_without_databricks_connect_nothing_expects_connect(monkeypatch):
    monkeypatch.setitem(sys.modules, "databricks.connect", None)  # import raises ImportError
    monkeypatch.delenv("SPARK_REMOTE", raising=False)
    assert not session.connect_expected(SparkSettings(master=None))
    assert session.connect_expected(SparkSettings(remote="sc://localhost:15002"))
    monkeypatch.setenv("SPARK_REMOTE", "sc://localhost:15002")
    assert session.remote_url(SparkSettings()) == "sc://localhost:15002" and session.connect_expected(SparkSettings())
    assert session.remote_url(SparkSettings(remote="sc://other:1")) == "sc://other:1"  # --remote wins


def test_the_real_databricks_connect_resolves_when_installed(monkeypatch):
    pytest.importorskip("databricks.connect", reason="databricks-connect is not installed in this lane (it replaces "
                                                     "pyspark: pip install databricks-connect in its own venv)")
    from pyspark.sql import SparkSession

    monkeypatch.setattr(SparkSession, "getActiveSession", staticmethod(lambda: None))
    for key in ("SPARK_REMOTE", "DATABRICKS_HOST", "DATABRICKS_CLUSTER_ID", "DATABRICKS_CONFIG_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", "/nonexistent/.databrickscfg")
    with pytest.raises(EnvironmentMismatchError, match="databricks-connect is installed but gave no session"):
        with session.spark_session(SparkSettings(master=None)):
            pass


def _connect_session(master: str | None, partitions: int = 7):
    """A stand-in Spark Connect session of a server on this machine whose static conf names ``master``, and whose
    ``spark.range`` without a partition count has ``partitions`` partitions."""
    fake = type("SparkSession", (), {"__module__": "pyspark.sql.connect.session"})()
    fake.client = types.SimpleNamespace(host="localhost")
    fake.conf = types.SimpleNamespace(get=lambda key, default=None: master if key == "spark.master" else default)
    last = types.SimpleNamespace(collect=lambda: [[partitions - 1]])
    fake.range = lambda *args: types.SimpleNamespace(selectExpr=lambda expression: last)
    return fake


def test_default_parallelism_over_connect_counts_a_local_masters_cores():
    """A local master's cores as Spark counts them; any other master (or none shown) asks Spark (7 partitions)."""
    assert [session.default_parallelism(_connect_session(url)) for url in ("local", "local[3]", "local[4, 2]",
                                                                          "spark://h:7077", None)] == [1, 3, 4, 7, 7]
    assert session.default_parallelism(_connect_session("local[*]")) == (os.cpu_count() or 1)


def test_auto_converter_takes_none_over_connect_and_petastorm_is_refused():
    choice = choose_converter(TrainSettings(), connect=True)
    assert choice.name == "none" and "Spark Connect" in choice.reason
    with pytest.raises(EnvironmentMismatchError, match="Spark Connect session"):
        choose_converter(TrainSettings(converter="petastorm"), connect=True)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its path, the generation's name (unique to each ingest) written ``G``."""
    generation = json.loads((root / "_manifest.json").read_text())["generation"]
    return {str(p.relative_to(root)).replace(generation, "G"): p.read_bytes().replace(generation.encode(), b"G")
            for p in sorted(root.rglob("*")) if p.is_file()}


INGEST_OPTIONS = {
    # one write job, the relation sent inline
    "one-job": {"num_shards": 3, "row_group_bytes": 64 * 784},
    # several write jobs (chunk_rows), and the relation uploaded as chunked artifacts rather than inline
    "chunked": {"num_shards": 2, "chunk_rows": 250, "cache_threshold": 2**16},
}


def _ingest_options(name: str) -> dict:
    """The ingest keywords of ``INGEST_OPTIONS[name]`` (without the Connect-only cache threshold)."""
    return {k: v for k, v in INGEST_OPTIONS[name].items() if k != "cache_threshold"}


@pytest.fixture(scope="module")
def classic_ingests(tmp_path_factory):
    """One source, and its classic ingest under each of ``INGEST_OPTIONS`` into ``classic-<name>``, all in one child
    process (one kind of session per process; one JVM for every option set)."""
    root = tmp_path_factory.mktemp("classic-ingests")
    write_dataset(root / "source", train_rows=700, test_rows=130)
    env = {k: v for k, v in os.environ.items() if k not in session.CONNECT_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    runs = {name: [str(root / f"classic-{name}"), _ingest_options(name)] for name in INGEST_OPTIONS}
    command = [sys.executable, "-c", "import json, sys; from spark_mnist.config import SparkSettings; "
               "from spark_mnist.driver.session import spark_session; from spark_mnist.driver.ingest import ingest\n"
               "with spark_session(SparkSettings(master='local[2]')) as spark:\n"
               "    for out, options in json.loads(sys.argv[2]).values():\n"
               "        ingest(spark, sys.argv[1], out, **options)",
               str(root / "source"), json.dumps(runs)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@requires_connect
@pytest.mark.slow
@pytest.mark.connect
@pytest.mark.parametrize("name", list(INGEST_OPTIONS))
def test_connect_ingest_equals_the_classic_one(spark, tmp_path, classic_ingests, name):
    """Over Spark Connect the dataset is the classic path's, file for file and byte for byte (the manifest apart
    from its timestamp and generation); the classic ingests ran in a child process (one kind of session per
    process)."""
    from spark_mnist.driver.ingest import ingest

    options = _ingest_options(name)
    threshold = INGEST_OPTIONS[name].get("cache_threshold")
    assert session.is_connect(spark)
    key = "spark.sql.session.localRelationCacheThreshold"
    previous = spark.conf.get(key, None)
    if threshold is not None:
        spark.conf.set(key, str(threshold))
    try:
        ingest(spark, str(classic_ingests / "source"), str(tmp_path / "connect"), **options)
    finally:
        if threshold is not None and previous is not None:
            spark.conf.set(key, previous)
        elif threshold is not None:
            spark.conf.unset(key)
    connect, classic = _files(tmp_path / "connect"), _files(classic_ingests / f"classic-{name}")
    assert sorted(connect) == sorted(classic)
    manifests = [json.loads(files.pop("_manifest.json")) for files in (connect, classic)]
    for manifest in manifests:
        manifest.pop("created_unix")
    assert manifests[0] == manifests[1]
    assert connect == classic  # every shard, byte for byte
    assert len(manifests[0]["splits"]["train"]["files"]) == options["num_shards"] or "chunk_rows" in options
