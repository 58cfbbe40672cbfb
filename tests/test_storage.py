"""Path normalisation: every accepted spelling of a source or output maps to one Spark URI and local path."""

from __future__ import annotations

import os

import pytest

from spark_mnist.errors import SourceError
from spark_mnist.paths import normalize_uri


@pytest.mark.parametrize("given, uri, local, kind", [
    ("dbfs:/mnt/mnist", "dbfs:/mnt/mnist", "/dbfs/mnt/mnist", "dbfs"),
    ("dbfs:///mnt/mnist", "dbfs:/mnt/mnist", "/dbfs/mnt/mnist", "dbfs"),
    ("/dbfs/mnt/mnist", "dbfs:/mnt/mnist", "/dbfs/mnt/mnist", "dbfs"),
    ("/Volumes/main/default/raw/mnist", "/Volumes/main/default/raw/mnist", "/Volumes/main/default/raw/mnist",
     "volume"),
    ("file:/data/mnist", "file:///data/mnist", "/data/mnist", "local"),
    ("file:///data/mnist", "file:///data/mnist", "/data/mnist", "local"),
    ("/data/mnist", "file:///data/mnist", "/data/mnist", "local"),
    ("s3://bucket/mnist", "s3://bucket/mnist", None, "remote"),
    ("abfss://c@acct.dfs.core.windows.net/mnist", "abfss://c@acct.dfs.core.windows.net/mnist", None, "remote"),
])
def test_normalize_uri(given, uri, local, kind):
    location = normalize_uri(given)
    assert (location.uri, location.local_path, location.kind) == (uri, local, kind)


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    location = normalize_uri("data/mnist")
    assert location.local_path == os.path.join(str(tmp_path), "data", "mnist")
    assert location.uri == (tmp_path / "data" / "mnist").as_uri()


def test_join_and_sibling_keep_both_forms():
    location = normalize_uri("dbfs:/mnt/out")
    assert location.join("train").uri == "dbfs:/mnt/out/train"
    assert location.join("train").local_path == "/dbfs/mnt/out/train"
    assert location.sibling(".out.staging").uri == "dbfs:/mnt/.out.staging"


def test_empty_path_is_an_error():
    with pytest.raises(SourceError, match="Invalid path"):
        normalize_uri("  ")


def test_driver_local_path_refused_on_a_cluster_master():
    from spark_mnist.paths import check_visible_to_executors

    check_visible_to_executors("local[2]", normalize_uri("/data/mnist"))  # executors share the driver's disk
    check_visible_to_executors("local-cluster[2,1,1024]", normalize_uri("/data/mnist"))
    with pytest.raises(SourceError, match="/data/mnist: a path on the driver's local disk"):
        check_visible_to_executors("spark://head:7077", normalize_uri("/data/mnist"))
    check_visible_to_executors("spark://head:7077", normalize_uri("dbfs:/mnt/mnist"))
    check_visible_to_executors("spark://head:7077", normalize_uri("/Volumes/main/default/raw/mnist"))
