"""The project's own test set-up, on the test kit users install with the wheel (:mod:`spark_mnist.testing`): its
``spark`` session fixture (classic ``local[2]``; Spark Connect with ``--spark-remote local[2]``), its IDX source and
ingested-dataset factories and ``spark_remote_args``.  Here only what is ours alone: the repository's paths, the
``requires_*`` markers, ``small_source`` and the environment-leak guard.

The Spark 4 lanes of ``make test`` run the suite once classic, then the tests marked ``connect`` (ingest, the
bad-input command, racing ingests, training, the end-to-end run) again over a local Connect server.  A process holds
one kind of session only: pyspark refuses to start a local Connect server beside a classic session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spark_mnist.testing import make_arrays, spark_remote, write_idx_source

pytest_plugins = ["tests.stores.servers"]  # the kit itself: -p spark_mnist.testing (pyproject addopts)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# Markers decided when a test is set up, from the run's options (:func:`pytest_runtest_setup`).
requires_petastorm = pytest.mark.requires_petastorm
requires_connect = pytest.mark.requires_connect

__all__ = ["REPO", "SHARED_DATA", "FASHION_DIR", "requires_petastorm", "requires_connect", "make_arrays",
           "write_dataset"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires_petastorm: skipped where petastorm's converter cannot run")
    config.addinivalue_line("markers", "requires_connect: needs a Spark Connect session (--spark-remote)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    connect = spark_remote(item.config) is not None
    if item.get_closest_marker("requires_connect") and not connect:
        pytest.skip("needs a Spark Connect session: the Spark 4 lanes run it with --spark-remote local[2] (make test)")
    if item.get_closest_marker("requires_petastorm"):
        from spark_mnist.driver.converter import petastorm_unavailable

        reason = petastorm_unavailable(connect=connect)
        if reason is not None:
            pytest.skip(f"petastorm cannot run in this lane: {reason}")


def write_dataset(directory: Path, train_rows: int = 600, test_rows: int = 100, seed: int = 0,
                  dataset: str = "fashion-mnist") -> dict[str, tuple]:
    """The four gz IDX files of a small synthetic ``dataset`` in ``directory`` (:func:`write_idx_source`); returns
    ``{split: (images, labels)}``."""
    return write_idx_source(directory, dataset, train_rows, test_rows, seed).arrays


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
