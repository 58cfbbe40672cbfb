"""Where the IDX bytes come from: a directory (local, ``file:/``, ``dbfs:/``, ``/dbfs/``, ``/Volumes/``) read
with Spark's ``binaryFile`` source, so every form goes through one code path.  Driver-side."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from spark_mnist import storage
from spark_mnist.errors import SourceError
from spark_mnist.storage import Location

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


@dataclass(frozen=True)
class SourceFile:
    """The bytes of one source file as Spark read them: ``uri`` (as Spark names it), ``content`` (the file's
    bytes, still gzip-compressed) and ``length`` (bytes)."""

    name: str
    uri: str
    content: bytes

    @property
    def length(self) -> int:
        return len(self.content)


def read_files(spark: "SparkSession", directory: Location, names: Sequence[str]) -> dict[str, SourceFile]:
    """Read the files ``names`` under ``directory`` with Spark's ``binaryFile`` source, in one job.

    Returns:
        ``{name: SourceFile}`` for every name.
    Raises:
        SourceError: a missing directory or file (the message names each missing path), or a driver-local path
            that the executors of a cluster could not see.
    """
    storage.check_visible_to_executors(spark, directory)
    if not storage.exists(spark, directory):
        raise SourceError(f"{directory.local_path or directory.uri}: source directory not found")
    wanted = {name: directory.join(name) for name in names}
    missing = [loc for loc in wanted.values() if not storage.exists(spark, loc)]
    if missing:
        listing = ", ".join(loc.local_path or loc.uri for loc in missing)
        raise SourceError(f"{listing}: file not found (expected {', '.join(names)} in {directory.uri})")
    # toPandas goes through Arrow (spark.sql.execution.arrow.pyspark.enabled), about twice as fast as collect()
    # for a few large binary rows.
    frame = (spark.read.format("binaryFile")
             .load([loc.uri for loc in wanted.values()])
             .select("path", "content")
             .toPandas())
    by_basename = {path.rstrip("/").rsplit("/", 1)[-1]: (path, content)
                   for path, content in zip(frame["path"], frame["content"])}
    found = {}
    for name in names:
        if name not in by_basename:
            raise SourceError(f"{wanted[name].uri}: Spark's binaryFile source returned no content for this file")
        path, content = by_basename[name]
        found[name] = SourceFile(name, path, bytes(content))
    return found
