"""Shared fixtures: a session-scoped local[2] SparkSession, small synthetic IDX datasets, an environment-leak guard.

The session is classic unless ``SPARK_MNIST_TEST_REMOTE`` names a Spark Connect server (``local[2]``: one started in
this process, as ``SparkSession.builder.remote("local[2]")`` does; ``sc://host:port``: one running elsewhere).  The
Spark 4 lanes of ``make test`` run the suite once classic, then the tests marked ``connect`` (ingest, the bad-input
command, racing ingests, training, the end-to-end run) again over a local Connect server.  A process holds one kind
of session only: pyspark refuses to start a local Connect server beside a classic session.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from spark_mnist.driver.converter import petastorm_unavailable
from spark_mnist.datasets import get_dataset
from spark_mnist.formats.idx import write_idx

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
TEST_REMOTE = os.environ.get("SPARK_MNIST_TEST_REMOTE") or None
_NO_PETASTORM = petastorm_unavailable(connect=TEST_REMOTE is not None)
requires_petastorm = pytest.mark.skipif(_NO_PETASTORM is not None,
                                        reason=f"petastorm cannot run in this lane: {_NO_PETASTORM}")
requires_connect = pytest.mark.skipif(TEST_REMOTE is None, reason="needs a Spark Connect session: the Spark 4 lanes "
                                      "run it with SPARK_MNIST_TEST_REMOTE=local[2] (make test)")


@pytest.fixture
def remote_args(spark) -> list[str]:
    """``spark-mnist`` options that make a child command use this run's kind of session: none for classic;
    over Spark Connect ``--remote sc://...``: the server named, or the local server the ``spark`` fixture started
    (a machine's port has room for one: a child starting its own would collide)."""
    if TEST_REMOTE is None:
        return []
    if TEST_REMOTE.startswith("sc://"):
        return ["--remote", TEST_REMOTE]
    port = spark.conf.get("spark.connect.grpc.binding.port", "15002")
    return ["--remote", f"sc://localhost:{port}"]


@pytest.fixture(scope="session")
def spark():
    """One local[2] SparkSession for the whole run, quiet, stopped at the end: classic, or a Spark Connect session
    where ``SPARK_MNIST_TEST_REMOTE`` is set."""
    from spark_mnist.config import SparkSettings
    from spark_mnist.driver.session import spark_session

    with spark_session(SparkSettings(master="local[2]", remote=TEST_REMOTE, app_name="spark-mnist-tests",
                                     conf={"spark.driver.memory": "2g"})) as session:
        yield session


def make_arrays(rows: int, seed: int = 0, num_classes: int = 10, shape=(28, 28)):
    """Random uint8 images (rows, H, W) and labels (rows,) covering every class when rows allow."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(rows, *shape), dtype=np.uint8)
    labels = (np.arange(rows) % num_classes).astype(np.uint8)
    rng.shuffle(labels)
    return images, labels


def write_dataset(directory: Path, train_rows: int = 600, test_rows: int = 100, seed: int = 0,
                  dataset: str = "fashion-mnist") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write the four standard gz IDX files of a small synthetic ``dataset`` into ``directory``."""
    spec = get_dataset(dataset)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, rows, split_seed in (("train", train_rows, seed), ("test", test_rows, seed + 1)):
        images, labels = make_arrays(rows, split_seed, spec.num_classes, spec.image_shape)
        write_idx(directory / spec.file(split, "images").name, images)
        write_idx(directory / spec.file(split, "labels").name, labels)
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture
def small_source(tmp_path):
    """A directory with a small synthetic Fashion-MNIST-shaped dataset; returns (path, arrays by split)."""
    source = tmp_path / "source"
    return source, write_dataset(source)


@pytest.fixture(autouse=True)
def no_env_leak():
    """Fail a test that leaves environment variables changed (as Lightning's conftest does)."""
    before = dict(os.environ)
    yield
    after = dict(os.environ)
    changed = {k for k in before.keys() | after.keys()
               if before.get(k) != after.get(k) and k != "PYTEST_CURRENT_TEST"}
    assert not changed, f"test leaked environment variables: {sorted(changed)}"
