"""Where datasets live: URI normalisation and the few file-system operations ingest needs.

One function, :func:`normalize_uri`, turns every accepted spelling into a :class:`Location`:

=============================  ==========================  ==============================
given                          Spark URI                   path on this machine
=============================  ==========================  ==============================
``dbfs:/x``                    ``dbfs:/x``                 ``/dbfs/x`` (Databricks FUSE)
``/dbfs/x``                    ``dbfs:/x``                 ``/dbfs/x``
``/Volumes/c/s/v/x``           ``/Volumes/c/s/v/x``        ``/Volumes/c/s/v/x``
``file:/x``, ``file:///x``     ``file:///x``               ``/x``
``x`` (relative or absolute)   ``file:///abs/x``           ``/abs/x``
``s3://b/x`` and other schemes ``s3://b/x``                none
=============================  ==========================  ==============================

Local paths go through :mod:`os` (whose ``rename`` is atomic on POSIX); everything else through Hadoop's
``FileSystem`` API on the driver JVM, so ``dbfs:/`` and object stores work the same way Spark sees them.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from spark_mnist.errors import SourceError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

DBFS_FUSE_ROOT = "/dbfs"
VOLUMES_ROOT = "/Volumes"


@dataclass(frozen=True)
class Location:
    """A normalised place: ``uri`` is what Spark reads and writes; ``local_path`` is the same place on this
    machine's file system, or ``None`` where there is no such path (object stores, ``dbfs:/`` off Databricks)."""

    uri: str
    local_path: str | None
    kind: str  # "local", "dbfs", "volume" or "remote"

    def join(self, *parts: str) -> "Location":
        """The location of ``parts`` below this one."""
        local = os.path.join(self.local_path, *parts) if self.local_path is not None else None
        return Location(posixpath.join(self.uri, *parts), local, self.kind)

    @property
    def name(self) -> str:
        return posixpath.basename(self.uri.rstrip("/"))

    def sibling(self, name: str) -> "Location":
        """A location beside this one, in the same parent directory."""
        parent_uri = posixpath.dirname(self.uri.rstrip("/"))
        parent_local = os.path.dirname(self.local_path.rstrip("/")) if self.local_path is not None else None
        return Location(posixpath.join(parent_uri, name),
                        os.path.join(parent_local, name) if parent_local is not None else None, self.kind)

    @property
    def is_local(self) -> bool:
        """True where :mod:`os` can operate on the place directly (local disk, DBFS FUSE, volumes)."""
        return self.local_path is not None and (self.kind == "local" or os.path.exists(
            DBFS_FUSE_ROOT if self.kind == "dbfs" else VOLUMES_ROOT))


def normalize_uri(path: str | os.PathLike) -> Location:
    """Normalise any accepted spelling of a directory or file (see the module docstring's table).

    Raises:
        SourceError: an empty path.
    """
    text = os.fspath(path).strip()
    if not text:
        raise SourceError("Invalid path: ''. Give a directory, file:/, dbfs:/, /dbfs/ or /Volumes/ path.")
    parsed = urlparse(text)
    if parsed.scheme == "dbfs":
        rest = "/" + (parsed.netloc + parsed.path).lstrip("/")
        return Location(f"dbfs:{rest}", DBFS_FUSE_ROOT + rest, "dbfs")
    if parsed.scheme == "file":
        local = "/" + (parsed.netloc + parsed.path).lstrip("/") if parsed.netloc else parsed.path
        return _local_location(local)
    if parsed.scheme and len(parsed.scheme) > 1:  # s3://, abfss://, gs://, ... (a one-letter scheme is a drive)
        return Location(text, None, "remote")
    return _local_location(text)


def _local_location(path: str) -> Location:
    absolute = os.path.abspath(os.path.expanduser(path))
    if absolute == DBFS_FUSE_ROOT or absolute.startswith(DBFS_FUSE_ROOT + "/"):
        rest = absolute[len(DBFS_FUSE_ROOT):] or "/"
        return Location(f"dbfs:{rest}", absolute, "dbfs")
    if absolute.startswith(VOLUMES_ROOT + "/"):
        return Location(absolute, absolute, "volume")
    return Location(Path(absolute).as_uri(), absolute, "local")


def check_visible_to_executors(master: str, location: Location) -> None:
    """Refuse a driver-local path when executors run on other machines and could not read it.

    Args:
        master: the Spark master URL (``spark.sparkContext.master``).
    Raises:
        SourceError: a local-disk path with a cluster master (not ``local``/``local-cluster``).
    """
    if location.kind == "local" and not master.startswith("local"):
        raise SourceError(
            f"{location.local_path}: a path on the driver's local disk, which executors of master {master!r} "
            f"cannot see; copy the files to dbfs:/... or /Volumes/<catalog>/<schema>/<volume>/... and use that"
        )


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
