"""The file-system layer with no Spark session (``spark_mnist.fs``): the same operations on local paths (through
``os``) and on a URI pyarrow has no file system for (fsspec's ``memory://``, through the fsspec fallback); the
errors for places nothing here reaches; and no pyspark import on the way."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from spark_mnist import fs
from spark_mnist.errors import SourceError
from spark_mnist.paths import Location, normalize_uri


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path) -> Location:
    """An empty directory: under ``tmp_path``, or in fsspec's in-memory file system (a unique one, removed after)."""
    if request.param == "local":
        yield normalize_uri(tmp_path / "root")
        return
    pytest.importorskip("fsspec")
    location = normalize_uri(f"memory://spark-mnist-{uuid.uuid4().hex[:12]}/root")
    assert location.kind == "remote" and location.os_path is None
    yield location
    fs.delete(location.sibling(""))


def makedirs(location: Location) -> None:
    """A directory and its parents, made with the file system ``fs`` resolves (where the tests need one)."""
    handle, path = fs.filesystem(location)
    handle.create_dir(path, recursive=True)


def test_makedirs_exists_and_list_names(root):
    assert not fs.exists(root)
    assert fs.list_names(root) == []
    makedirs(root.join("train"))
    makedirs(root.join("train"))  # nothing happens where it exists
    makedirs(root.join("test"))
    fs.write_whole(root.join(".hidden"), b"x")
    fs.write_whole(root.join("train", "part-00000.parquet"), b"shard")
    assert fs.exists(root) and fs.exists(root.join("train")) and fs.exists(root.join(".hidden"))
    assert not fs.exists(root.join("nope"))
    assert fs.list_names(root) == [".hidden", "test", "train"]
    assert fs.list_names(root.join("train")) == ["part-00000.parquet"]
    assert fs.list_names(root.join("test")) == []
    assert fs.list_names(root.join("nope")) == []


def _read(location: Location) -> str:
    handle, path = fs.filesystem(location)
    with handle.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")


def test_write_whole_replaces_the_file(root):
    makedirs(root)
    fs.write_whole(root.join("manifest.json"), b"first, longer text\n")
    fs.write_whole(root.join("manifest.json"), "zweite Fassung: é ✓\n".encode())
    assert _read(root.join("manifest.json")) == "zweite Fassung: é ✓\n"
    assert fs.list_names(root) == ["manifest.json"]  # no temporary file left beside it


def test_delete_is_recursive_and_quiet_where_nothing_exists(root):
    makedirs(root.join("a", "b"))
    fs.write_whole(root.join("a", "b", "f"), b"x")
    fs.write_whole(root.join("g"), b"y")
    fs.delete(root.join("g"))
    assert fs.list_names(root) == ["a"]
    fs.delete(root.join("a"))
    assert fs.list_names(root) == []
    fs.delete(root.join("a"))  # nothing there: nothing happens
    fs.delete(root.join("never"))


def test_filesystem_serves_local_paths_and_memory_uris(tmp_path):
    handle, path = fs.filesystem(normalize_uri(tmp_path))
    assert (handle.type_name, path) == ("local", str(tmp_path))
    pytest.importorskip("fsspec")
    handle, path = fs.filesystem(normalize_uri("memory://bucket/x"))
    assert handle.type_name == "py::fsspec+memory" and path.endswith("bucket/x")


@pytest.mark.parametrize("uri", ["foo://bucket/x", "notascheme://x"])
def test_unsupported_scheme_is_one_source_error_naming_it(uri):
    location = normalize_uri(uri)
    for operation in (fs.exists, fs.list_names, makedirs, fs.delete):
        with pytest.raises(SourceError, match=rf"^{uri}: no file system for {uri.split(':')[0]}://.*supported"):
            operation(location)


def test_missing_fsspec_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)  # `import fsspec` raises ImportError
    with pytest.raises(SourceError, match=r"^s3a://b/x: .*no file system for s3a://.*fsspec is not installed; "
                                          r"pip install fsspec s3fs$"):
        fs.exists(normalize_uri("s3a://b/x"))


def test_dbfs_and_volumes_without_their_fuse_mount_say_so():
    dbfs = Location("dbfs:/mnt/out", "/dbfs/mnt/out", "dbfs")
    volume = Location("/Volumes/c/s/v/out", "/Volumes/c/s/v/out", "volume")
    if dbfs.os_path is not None or volume.os_path is not None:
        pytest.skip("this machine has the Databricks FUSE mounts")
    with pytest.raises(SourceError, match=r"^dbfs:/mnt/out: dbfs:/ paths need the /dbfs FUSE mount.*/Volumes/"):
        fs.exists(dbfs)
    with pytest.raises(SourceError, match=r"^/Volumes/c/s/v/out: /Volumes paths need the /Volumes FUSE mount"):
        makedirs(volume)


def test_fs_and_commit_import_no_spark():
    code = ("import sys; sys.modules['pyspark'] = None\n"
            "import spark_mnist.fs, spark_mnist.shards.commit\n"
            "bad = sorted(m for m, module in sys.modules.items()\n"
            "             if module is not None and m.split('.')[0] in ('pyspark', 'py4j', 'pyarrow', 'fsspec'))\n"
            "assert not bad, bad\n")
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr


def test_commit_through_the_layer_replaces_a_previous_dataset(root):
    """The commit protocol on top of this layer: each dataset a generation, the manifest written last, the previous
    generation kept, older ones removed by the clean-up (here ``gc``'s, with no retention; on a local directory and
    on a URI served by fsspec)."""
    import numpy as np

    from spark_mnist.shards import commit

    from spark_mnist.datasets import get_dataset
    from spark_mnist.shards.arrays import write_local_dataset
    from spark_mnist.shards.contract import MANIFEST_NAME, open_dataset
    from spark_mnist.shards.parquet import plan_row_groups, read_rows

    output = root.join("out")
    manifests = []
    for value in (1, 2, 3):
        arrays = {"train": (np.full((6, 2, 2), value, np.uint8), np.arange(6) % 3)}
        manifests.append(write_local_dataset(output.uri, get_dataset("mnist"), arrays, num_shards=2))
        assert fs.list_names(root) == ["out"]
        commit.clean(output, older_than=0)
        kept = [m.generation for m in manifests[-2:]]
        assert fs.list_names(output) == sorted(kept + [MANIFEST_NAME])
        dataset = open_dataset(output.uri)
        assert dataset.manifest.generation == manifests[-1].generation and dataset.rows("train") == 6
        _, images, _ = read_rows(plan_row_groups(dataset.files("train")), 0, 6, 4)
        assert (images == value).all()
    assert manifests[-1].previous == manifests[-2].generation


def test_manifest_write_falls_back_to_a_whole_write_where_rename_is_refused(tmp_path, monkeypatch):
    """A mount that answers rename with ENOSYS (a Unity Catalog volume's FUSE) gets the file written whole in place,
    and no temporary file is left."""
    import errno

    def refuse(src, dst):
        raise OSError(errno.ENOSYS, "Function not implemented")

    target = normalize_uri(tmp_path / "_manifest.json")
    fs.write_whole(target, b"old")
    monkeypatch.setattr(os, "replace", refuse)
    fs.write_whole(target, b"new, longer")
    assert (tmp_path / "_manifest.json").read_text() == "new, longer"
    assert os.listdir(tmp_path) == ["_manifest.json"]


@pytest.mark.parametrize("uri, endpoint", [
    ("s3://bucket/out", "http://127.0.0.1:9000"),
    ("s3://bucket/out?endpoint_override=10.0.0.1:9&scheme=http", "http://127.0.0.1:9000"),
])
def test_s3_endpoint_from_aws_endpoint_url_unless_the_uri_names_one(monkeypatch, uri, endpoint):
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    rewritten = fs.task_uri(normalize_uri(uri))
    if "endpoint_override" in uri:
        assert rewritten == uri
    else:
        assert rewritten == "s3://bucket/out?endpoint_override=127.0.0.1%3A9000&scheme=http"
