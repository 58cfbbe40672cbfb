"""The driver's file operations on datasets: exists, delete, list, mkdirs, rename, small writes.

Local paths (local disk, ``/dbfs`` FUSE, ``/Volumes``) go through :mod:`os` (whose ``rename`` is atomic on POSIX);
everything else through Hadoop's ``FileSystem`` API on the driver JVM, so ``dbfs:/`` and object stores work the
same way Spark sees them.  Driver-side.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from spark_mnist.paths import Location

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def _hadoop_fs(spark: "SparkSession", uri: str):
    jvm = spark.sparkContext._jvm
    jpath = jvm.org.apache.hadoop.fs.Path(uri)
    return jpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), jpath


def exists(spark: "SparkSession", location: Location) -> bool:
    """Whether anything exists at ``location``."""
    if location.is_local:
        return os.path.exists(location.local_path)
    fs, jpath = _hadoop_fs(spark, location.uri)
    return bool(fs.exists(jpath))


def delete(spark: "SparkSession", location: Location) -> None:
    """Remove ``location`` recursively; nothing happens where nothing exists."""
    if location.is_local:
        if os.path.isdir(location.local_path):
            shutil.rmtree(location.local_path, ignore_errors=True)
        elif os.path.exists(location.local_path):
            os.remove(location.local_path)
        return
    fs, jpath = _hadoop_fs(spark, location.uri)
    fs.delete(jpath, True)


def list_names(spark: "SparkSession", location: Location) -> list[str]:
    """Names of the entries directly in the directory ``location`` (files and directories, hidden ones included),
    sorted; empty where nothing exists there."""
    if location.is_local:
        return sorted(os.listdir(location.local_path)) if os.path.isdir(location.local_path) else []
    fs, jpath = _hadoop_fs(spark, location.uri)
    if not fs.exists(jpath):
        return []
    return sorted(str(status.getPath().getName()) for status in fs.listStatus(jpath))


def makedirs(spark: "SparkSession", location: Location) -> None:
    """Create the directory ``location`` and its parents; nothing happens where it exists."""
    if location.is_local:
        os.makedirs(location.local_path, exist_ok=True)
        return
    fs, jpath = _hadoop_fs(spark, location.uri)
    fs.mkdirs(jpath)


def rename(spark: "SparkSession", src: Location, dst: Location) -> None:
    """Rename ``src`` to ``dst`` (both in the same directory tree); ``dst`` must not exist.

    Raises:
        FileExistsError: ``dst`` exists (on local paths: a non-empty directory or a file).
        OSError: the rename failed.
    """
    if src.is_local:
        try:
            os.rename(src.local_path, dst.local_path)
        except OSError as e:
            if os.path.exists(dst.local_path):
                raise FileExistsError(dst.local_path) from e
            raise
        return
    fs, src_path = _hadoop_fs(spark, src.uri)
    _, dst_path = _hadoop_fs(spark, dst.uri)
    if fs.exists(dst_path):
        raise FileExistsError(dst.uri)
    if not fs.rename(src_path, dst_path):
        raise OSError(f"rename {src.uri} -> {dst.uri} failed")


def write_text(spark: "SparkSession", location: Location, text: str) -> None:
    """Write ``text`` (UTF-8) to the file ``location``, replacing it."""
    if location.is_local:
        Path(location.local_path).write_text(text, encoding="utf-8")
        return
    fs, jpath = _hadoop_fs(spark, location.uri)
    stream = fs.create(jpath, True)
    try:
        stream.write(bytearray(text.encode("utf-8")))
    finally:
        stream.close()
