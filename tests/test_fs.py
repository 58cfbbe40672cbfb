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
    assert location.kind == "remote" and not location.is_local
    yield location
    fs.delete(location.sibling(""))


def test_makedirs_exists_and_list_names(root):
    assert not fs.exists(root)
    assert fs.list_names(root) == []
    fs.makedirs(root.join("train"))
    fs.makedirs(root.join("train"))  # nothing happens where it exists
    fs.makedirs(root.join("test"))
    fs.write_text(root.join(".hidden"), "x")
    fs.write_text(root.join("train", "part-00000.parquet"), "shard")
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


def test_write_text_replaces_in_utf8(root):
    fs.makedirs(root)
    fs.write_text(root.join("manifest.json"), "first, longer text\n")
    fs.write_text(root.join("manifest.json"), "zweite Fassung: é ✓\n")
    assert _read(root.join("manifest.json")) == "zweite Fassung: é ✓\n"
    assert fs.list_names(root) == ["manifest.json"]  # no temporary file left beside it


def test_rename_moves_a_tree_and_refuses_an_existing_destination(root):
    src, dst = root.join(".out.staging-x"), root.join("out")
    fs.makedirs(src.join("train"))
    fs.write_text(src.join("train", "part-00000.parquet"), "shard")
    fs.write_text(src.join("manifest.json"), "{}")
    fs.rename(src, dst)
    assert not fs.exists(src)
    assert fs.list_names(dst) == ["manifest.json", "train"]
    assert _read(dst.join("train", "part-00000.parquet")) == "shard"

    fs.makedirs(src)
    fs.write_text(src.join("manifest.json"), "{}")
    with pytest.raises(FileExistsError):
        fs.rename(src, dst)
    assert fs.exists(src) and fs.list_names(dst) == ["manifest.json", "train"]  # both left as they were
    with pytest.raises(FileNotFoundError):
        fs.rename(root.join("missing"), root.join("elsewhere"))


def test_delete_is_recursive_and_quiet_where_nothing_exists(root):
    fs.makedirs(root.join("a", "b"))
    fs.write_text(root.join("a", "b", "f"), "x")
    fs.write_text(root.join("g"), "y")
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
    for operation in (fs.exists, fs.list_names, fs.makedirs, fs.delete):
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
    if dbfs.is_local or volume.is_local:
        pytest.skip("this machine has the Databricks FUSE mounts")
    with pytest.raises(SourceError, match=r"^dbfs:/mnt/out: dbfs:/ paths need the /dbfs FUSE mount.*/Volumes/"):
        fs.exists(dbfs)
    with pytest.raises(SourceError, match=r"^/Volumes/c/s/v/out: /Volumes paths need the /Volumes FUSE mount"):
        fs.makedirs(volume)


def test_copy_tree_copies_files_and_empty_directories(tmp_path):
    """The directory "rename" on S3 and GCS (copy every object, then delete), here on pyarrow's local file system."""
    from pyarrow.fs import LocalFileSystem

    (tmp_path / "src" / "train").mkdir(parents=True)
    (tmp_path / "src" / "test").mkdir()
    (tmp_path / "src" / "train" / "part-00000.parquet").write_bytes(b"shard")
    (tmp_path / "src" / "manifest.json").write_text("{}")
    fs._copy_tree(LocalFileSystem(), str(tmp_path / "src"), str(tmp_path / "dst"))
    assert sorted(str(p.relative_to(tmp_path / "dst")) for p in (tmp_path / "dst").rglob("*")) == [
        "manifest.json", "test", "train", os.path.join("train", "part-00000.parquet")]
    assert (tmp_path / "dst" / "train" / "part-00000.parquet").read_bytes() == b"shard"


def test_local_rename_is_os_rename(tmp_path):
    """Local paths keep ``os.rename`` (atomic on POSIX): a file in the way of a directory is FileExistsError."""
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").write_text("in the way")
    with pytest.raises(FileExistsError):
        fs.rename(normalize_uri(tmp_path / "src"), normalize_uri(tmp_path / "dst"))
    os.remove(tmp_path / "dst")
    fs.rename(normalize_uri(tmp_path / "src"), normalize_uri(tmp_path / "dst"))
    assert sorted(os.listdir(tmp_path)) == ["dst"]


def test_fs_and_commit_import_no_spark():
    code = ("import sys; sys.modules['pyspark'] = None\n"
            "import spark_mnist.fs, spark_mnist.driver.commit\n"
            "bad = sorted(m for m, module in sys.modules.items()\n"
            "             if module is not None and m.split('.')[0] in ('pyspark', 'py4j', 'pyarrow', 'fsspec'))\n"
            "assert not bad, bad\n")
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr


def test_commit_through_the_layer_replaces_a_previous_dataset(root):
    """The commit protocol on top of this layer: scratch files dropped, the previous dataset replaced, nothing left
    aside (on a local directory and on a URI served by fsspec)."""
    from spark_mnist.driver.commit import commit, scratch_name, staging_for

    output = root.join("out")
    for text in ("first", "second"):
        staging = staging_for(output)
        fs.makedirs(staging.join("train"))
        fs.write_text(staging.join("train", "part-00000.parquet"), text)
        fs.write_text(staging.join("train", scratch_name("part-00001.parquet", 7)), "half")
        fs.write_text(staging.join("manifest.json"), "{}")
        commit(staging, output)
        assert fs.list_names(root) == ["out"]
        assert fs.list_names(output.join("train")) == ["part-00000.parquet"]
        assert _read(output.join("train", "part-00000.parquet")) == text
