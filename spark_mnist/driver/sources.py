"""Where the IDX bytes come from: a directory (local, ``file:/``, ``dbfs:/``, ``/dbfs/``, ``/Volumes/``, or an
object store's ``s3://``, ``gs://``, ``abfss://``) read with Spark's ``binaryFile`` source.  Driver-side.

An object-store URI that carries a query string (pyarrow's ``endpoint_override``, ``account_key``, ...) or
credentials is read through :mod:`pyarrow.fs` on the driver instead: Hadoop's file systems take neither, and a
secret must not enter Spark's plans, UI or event log.  So is a bare URI whose scheme this session's Spark has no
file system for (local Spark without ``hadoop-aws``); on Databricks, Spark reads it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import urlsplit

from spark_mnist import fs
from spark_mnist.driver import session
from spark_mnist.errors import SourceError
from spark_mnist.paths import Location, check_visible_to_executors, redact

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["MAX_COLLECT_BYTES", "SourceFile", "read_files", "NO_FILESYSTEM"]

log = logging.getLogger(__name__)

# Files up to this size travel to the driver through Spark's binaryFile source; larger ones (binaryFile stops at
# 2 GiB, and the driver would hold them whole) are streamed from their driver-visible path (local, /dbfs, /Volumes).
MAX_COLLECT_BYTES = 512 * 2**20


@dataclass(frozen=True)
class SourceFile:
    """One source file: ``uri`` (as Spark names it), ``length`` (bytes, still compressed) and either ``content``
    (the bytes, read through Spark) or ``local_path`` (to stream from, for files over :data:`MAX_COLLECT_BYTES`)."""

    name: str
    uri: str
    length: int
    content: bytes | None = None
    local_path: str | None = None

    @property
    def source(self) -> bytes | str:
        """What :class:`spark_mnist.formats.idx.IdxReader` reads: the bytes, or the path to stream."""
        if self.content is not None:
            return self.content
        if self.local_path is None:
            raise ValueError(f"{self.name}: neither content nor a local path")
        return self.local_path


def read_files(
    spark: "SparkSession", directory: Location, names: Sequence[str], *, max_collect_bytes: int = MAX_COLLECT_BYTES
) -> dict[str, SourceFile]:
    """Read the files ``names`` under ``directory`` with Spark's ``binaryFile`` source, in one job; files over
    ``max_collect_bytes`` with a driver-visible path are left to be streamed from it instead.

    Returns:
        ``{name: SourceFile}`` for every name.
    Raises:
        SourceError: a missing directory or file (the message names each missing path), or a driver-local path
            that the executors of a cluster could not see.
    """
    check_visible_to_executors(session.master_here(spark), directory)
    if not fs.exists(directory):
        raise SourceError(f"{directory.shown}: source directory not found")
    wanted = {name: directory.join(name) for name in names}
    missing = [loc for loc in wanted.values() if not fs.exists(loc)]
    if missing:
        listing = ", ".join(loc.shown for loc in missing)
        raise SourceError(f"{listing}: file not found (expected {', '.join(names)} in {directory.shown})")
    found, collect = {}, []
    for name, loc in wanted.items():
        size = os.path.getsize(loc.os_path) if loc.os_path is not None else None
        if size is not None and size > max_collect_bytes:
            found[name] = SourceFile(name, loc.uri, size, local_path=loc.local_path)
        elif _spark_may_read(loc):
            collect.append(name)
        else:
            found[name] = _read_on_driver(name, loc)
    if collect:
        # toPandas goes through Arrow (spark.sql.execution.arrow.pyspark.enabled): faster than collect() here.
        try:
            frame: Any = (
                spark.read.format("binaryFile")
                .load([wanted[name].uri for name in collect])
                .select("path", "length", "content")
                .toPandas()
            )
        except Exception as e:
            if not any(marker in str(e) for marker in NO_FILESYSTEM):
                raise
            log.info(
                "%s: this Spark has no file system for %s://; reading the files through pyarrow on the driver",
                directory.shown,
                urlsplit(directory.uri).scheme,
            )
            found.update((name, _read_on_driver(name, wanted[name])) for name in collect)
            return {name: found[name] for name in names}
        rows = {
            path.rstrip("/").rsplit("/", 1)[-1]: (path, int(length), content)
            for path, length, content in zip(frame["path"], frame["length"], frame["content"])
        }
        for name in collect:
            if name not in rows:
                raise SourceError(f"{wanted[name].uri}: Spark's binaryFile source returned no content for this file")
            path, length, content = rows[name]
            if length > max_collect_bytes:
                raise SourceError(
                    f"{path}: {length} bytes, too large to read through Spark onto the driver; put it "
                    f"on a path the driver can stream from (/dbfs/..., /Volumes/..., local disk)"
                )
            found[name] = SourceFile(name, path, length, content=bytes(content))
    return {name: found[name] for name in names}


# What Hadoop says, classic and over Spark Connect alike, for a scheme it has no file system for.
NO_FILESYSTEM = ("UnsupportedFileSystemException", "No FileSystem for scheme")


def _spark_may_read(location: Location) -> bool:
    """Whether ``location`` goes to Spark's ``binaryFile`` source: any place but an object-store URI with a query
    string or credentials (see the module docstring)."""
    return location.kind != "remote" or not (urlsplit(location.uri).query or redact(location.uri) != location.uri)


def _read_on_driver(name: str, location: Location) -> SourceFile:
    """One source file's bytes through :mod:`pyarrow.fs`, on the driver."""
    content = fs.read_bytes(location)
    return SourceFile(name, location.uri, len(content), content=content)
