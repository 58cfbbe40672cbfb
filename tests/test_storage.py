"""Path normalisation: every accepted spelling of a source or output maps to one Spark URI and local path; the one
local/FUSE check (``require_local``), the one atomic write (``fs.replacing``) and the one "Invalid X" message form."""

from __future__ import annotations

import os
import re

import pytest

from spark_mnist.errors import InputError, SourceError, check_choice, invalid
from spark_mnist.fs import replacing
from spark_mnist.paths import normalize_uri, require_local


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


@pytest.mark.parametrize("given, local", [
    ("/data/mnist", "/data/mnist"), ("file:///data/mnist", "/data/mnist"), ("dbfs:/mnt/mnist", "/dbfs/mnt/mnist"),
    ("/Volumes/main/default/raw/mnist", "/Volumes/main/default/raw/mnist"),
])
def test_require_local_gives_the_local_form(given, local):
    assert require_local(given, "verify") == local


@pytest.mark.parametrize("given", ["s3://bucket/mnist", "abfss://c@acct.dfs.core.windows.net/mnist"])
def test_require_local_refuses_uris_without_one(given):
    with pytest.raises(SourceError, match=rf"^{re.escape(given)}: verify takes local paths only .*/dbfs/.*/Volumes/"):
        require_local(given, "verify")


def test_replacing_writes_under_the_final_name_only_when_complete(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("old")
    with replacing(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError, match="boom"):
        with replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_invalid_and_check_choice_write_one_message_form():
    error = invalid("retries", 0, "at least 1")
    assert type(error) is ValueError and str(error) == "Invalid retries: 0. Must be at least 1."
    assert check_choice("split", "test", ("train", "test")) == "test"
    with pytest.raises(InputError, match=r"^Invalid split: 'dev'\. Must be one of 'train', 'test'\.$"):
        check_choice("split", "dev", ("train", "test"), InputError)


@pytest.mark.parametrize("uri", [
    "abfss://c@devstoreaccount1.dfs.core.windows.net/out?blob_storage_authority=127.0.0.1:10000",
    "s3://key:secret@bucket/out?endpoint_override=127.0.0.1:9000&scheme=http",
])
def test_join_and_sibling_keep_a_uris_query_at_its_end(uri):
    """An object store's endpoint in the query string stays there: the paths below OUT go before it."""
    location = normalize_uri(uri)
    base, query = uri.split("?")
    assert location.join("g", "train").uri == f"{base}/g/train?{query}"
    assert location.sibling(".x").uri == f"{base.rsplit('/', 1)[0]}/.x?{query}"
    assert location.name == "out"
