"""The dataset contract between ingest (writer, driver) and every reader (the ranks' loader, petastorm's converter
source, ``load_data``, ``evaluate``, ``preview``, the benchmarks): the manifest is the dataset.

An ingested dataset ``OUT`` holds::

    OUT/_manifest.json                            the commit: written last, in one single-object write
    OUT/<generation>/train/part-NNNNN.parquet     immutable once written; invisible until a manifest names them
    OUT/<generation>/test/part-NNNNN.parquet

A generation is one ingest's files, named ``<UTC time>-<uuid>`` (:func:`spark_mnist.shards.commit.new_generation`).
The manifest (:class:`Manifest`) names its generation, the one it replaced (``previous``) and every shard file of
every split with its path relative to ``OUT``, its size in bytes and its rows.  Readers open a dataset only through
:func:`open_dataset`, which reads the manifest once and checks every named file's size before the first read; files
under ``OUT`` that no manifest names are ignored.  Corruption inside a shard is caught by Parquet's page checksums
(CRC-32 of every data page, written by :func:`spark_mnist.shards.parquet.write_rows`, verified on every read).

Each Parquet shard has the columns below, rows in ascending ``index`` order, shard k holding the k-th contiguous
range of the source file.  ``image`` is the raw pixels, row-major (H x W), uint8, exactly ``H*W`` bytes per row.
Any change to this layout bumps :data:`SCHEMA_VERSION` (1: the previous release's ``OUT/train``, ``OUT/test``
without generations; refused with one line saying to re-ingest).  No Spark and no torch here.
"""

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from spark_mnist import fs
from spark_mnist.errors import DatasetNotFoundError, SourceError, check_choice
from spark_mnist.paths import Location, normalize_uri, redact

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem

__all__ = ["SCHEMA_VERSION", "MANIFEST_NAME", "ROW_GROUP_BYTES", "INDEX", "IMAGE", "LABEL", "COLUMNS", "shard_bounds",
           "shard_path", "ShardFile", "Split", "Manifest", "read_manifest", "Dataset", "open_dataset"]  # fmt: skip

SCHEMA_VERSION = 2
MANIFEST_NAME = "_manifest.json"
# Parquet row-group target: ~1 MiB is ~1,300 MNIST rows, so 60,000 training rows make ~45 row groups and every rank
# of a typical run (up to 8 x a few GPUs) has several of them.
ROW_GROUP_BYTES = 2**20
INDEX, IMAGE, LABEL = "index", "image", "label"
COLUMNS = (INDEX, IMAGE, LABEL)
# A manifest read while a mount without rename is still writing it (whole-object write, see fs.write_whole) is read
# again this many times, this many seconds apart, before it counts as unreadable.
MANIFEST_READ_TRIES, MANIFEST_READ_PAUSE_S = 5, 0.05


def shard_bounds(rows: int, num_shards: int) -> np.ndarray:
    """Row boundaries of ``num_shards`` contiguous shards over ``rows`` rows: shard k is ``[b[k], b[k+1])``; sizes
    differ by at most one.  ``num_shards`` is capped at ``rows`` so that no shard is empty."""
    return np.linspace(0, rows, max(1, min(num_shards, rows)) + 1).round().astype(np.int64)


def shard_path(generation: str, split: str, k: int) -> str:
    """The path of shard ``k`` of ``split`` relative to ``OUT``: ``<generation>/<split>/part-NNNNN.parquet``."""
    return f"{generation}/{split}/part-{k:05d}.parquet"


@dataclass(frozen=True)
class ShardFile:
    """One Parquet shard: ``path`` relative to ``OUT`` (``/``-separated), its size in ``bytes`` and its ``rows``."""

    path: str
    bytes: int
    rows: int


@dataclass(frozen=True)
class Split:
    """One split of a dataset: its ``rows``, its shard ``files`` in shard order and its ``label_histogram``
    (images per class, ``len(classes)`` entries)."""

    rows: int
    files: tuple[ShardFile, ...]
    label_histogram: tuple[int, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """``OUT/_manifest.json``: what makes the files of one generation a dataset.

    Attributes:
        generation: the directory under ``OUT`` that holds this dataset's shards.
        previous: the generation this one replaced (kept by retention, so its readers go on reading), or ``None``.
        dataset: the registry name (:mod:`spark_mnist.datasets`).
        classes: class names, label ``i`` is ``classes[i]``.
        image_shape: (H, W) in pixels.
        splits: ``{"train": Split, "test": Split}``.
        source: ``{"uri": ..., "files": [{"uri", "bytes", "sha256", ...}, ...]}``, what was ingested.
        package_version, created_unix, schema_version: who wrote it, when (seconds since the epoch), which layout.
    """

    generation: str
    dataset: str
    classes: tuple[str, ...]
    image_shape: tuple[int, int]
    splits: dict[str, Split]
    source: dict[str, Any] = field(default_factory=dict)
    previous: str | None = None
    package_version: str = ""
    created_unix: float = field(default_factory=lambda: round(time.time(), 3))
    schema_version: int = SCHEMA_VERSION

    def files(self) -> list[ShardFile]:
        """Every shard file of every split."""
        return [f for split in self.splits.values() for f in split.files]

    def to_json(self) -> str:
        """The JSON document written to ``_manifest.json``: the fields above and the columns' Spark SQL types (long,
        binary, int)."""
        columns = {INDEX: "bigint", IMAGE: "binary", LABEL: "int"}
        return json.dumps({**asdict(self), "columns": columns}, indent=2) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, as written to ``_manifest.json`` (:meth:`to_json`) and read back."""
        return json.loads(self.to_json())

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> "Manifest":
        """Parse a manifest read from ``where`` (named in errors).

        Raises:
            DatasetNotFoundError: not JSON, a schema version other than :data:`SCHEMA_VERSION` (version 1 says to
                re-ingest), or a key missing.
        """
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetNotFoundError(f"{where}: unreadable manifest ({e})") from e
        version = doc.get("schema_version") if isinstance(doc, dict) else None
        if version != SCHEMA_VERSION:
            raise DatasetNotFoundError(
                f"{where}: a dataset of schema version 1 (spark-mnist 0.1), which this version no longer reads; "
                "re-ingest it with `spark-mnist ingest`"
                if version == 1
                else f"{where}: schema version {version!r}, this package reads version {SCHEMA_VERSION}; re-run ingest"
            )
        try:
            height, width = (int(n) for n in doc["image_shape"])
            splits = {}
            for name, s in doc["splits"].items():
                files = tuple(ShardFile(str(f["path"]), int(f["bytes"]), int(f["rows"])) for f in s["files"])
                splits[name] = Split(int(s["rows"]), files, tuple(s.get("label_histogram", ())))
            kept = {k: doc[k] for k in ("source", "previous", "package_version", "created_unix") if k in doc}
            classes = tuple(str(c) for c in doc["classes"])
            return cls(doc["generation"], doc["dataset"], classes, (height, width), splits, **kept)
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetNotFoundError(f"{where}: manifest without a valid {e} entry; re-run ingest") from e


def read_manifest(filesystem: "FileSystem", root: str, where: str) -> Manifest | None:
    """The manifest at ``root/_manifest.json`` on ``filesystem`` (``where``: its URI, for messages), or ``None``
    where there is none.  A manifest caught mid-write (a mount without rename writes it whole, in place), or
    replaced while it was read (pyarrow's Azure reads a blob in ranges of the size it saw first, and a replacement
    of another size answers 416), is read again a few times before it counts as unreadable.

    Raises:
        DatasetNotFoundError: as :meth:`Manifest.from_json`.
        OSError: the store failed on every try.
    """
    for attempt in range(1, MANIFEST_READ_TRIES + 1):
        try:
            with filesystem.open_input_stream(f"{root.rstrip('/')}/{MANIFEST_NAME}") as stream:
                return Manifest.from_json(stream.read(), where)
        except FileNotFoundError:
            return None
        except (OSError, DatasetNotFoundError) as e:
            # Tried again: a failing store, or text that is no JSON (a write caught midway); not a JSON manifest.
            torn = isinstance(e, OSError) or isinstance(e.__cause__, (json.JSONDecodeError, UnicodeDecodeError))
            if attempt == MANIFEST_READ_TRIES or not torn:
                raise
        time.sleep(MANIFEST_READ_PAUSE_S)
    return None  # not reached: the last try returns or raises


class Dataset:
    """An ingested dataset opened through its manifest (:func:`open_dataset`); the one way every reader gets at it.

    Attributes:
        location: ``OUT`` (:class:`~spark_mnist.paths.Location`).
        manifest: the :class:`Manifest` read when the dataset was opened; later ingests do not change this object.
        filesystem, root: the pyarrow file system that serves ``OUT`` and ``OUT``'s path on it
            (:func:`spark_mnist.fs.filesystem`).
        splits: the manifest's split names (``["train", "test"]``).
        image_shape: (H, W) in pixels.
        classes: class names, label ``i`` is ``classes[i]``.
        dataset: the registry name of the ingested dataset.
    """

    def __init__(self, location: Location, manifest: Manifest, filesystem: "FileSystem", root: str):
        self.location, self.manifest, self.filesystem, self.root = location, manifest, filesystem, root
        self.splits = list(manifest.splits)
        self.image_shape, self.classes, self.dataset = manifest.image_shape, manifest.classes, manifest.dataset

    def split(self, split: str) -> Split:
        """The :class:`Split` ``split``.

        Raises:
            ValueError: ``split`` is not one of the manifest's splits ("Invalid split: ... Must be one of ...").
        """
        check_choice("split", split, self.manifest.splits)
        return self.manifest.splits[split]

    def rows(self, split: str) -> int:
        """Rows of ``split``."""
        return self.split(split).rows

    def files(self, split: str) -> list[str]:
        """URIs of ``split``'s shards, in shard order, as Spark and :func:`spark_mnist.shards.parquet.plan_row_groups`
        read them: ``spark.read.parquet(*ds.files("train"))``."""
        return [self.location.join(*f.path.split("/")).uri for f in self.split(split).files]

    def paths(self, split: str) -> list[str]:
        """Paths of ``split``'s shards on :attr:`filesystem`, in shard order."""
        return [f"{self.root}/{f.path}" for f in self.split(split).files]

    def __repr__(self) -> str:
        rows = ", ".join(f"{name} {s.rows} rows" for name, s in self.manifest.splits.items())
        return f"Dataset({self.location.shown!r}, {self.dataset}, generation {self.manifest.generation}, {rows})"


def open_dataset(path: str | os.PathLike) -> Dataset:
    """Open the dataset ingested at ``path`` (``OUT``): read its manifest once and check every file it names.

    ``path`` is any spelling :func:`spark_mnist.paths.normalize_uri` accepts: a local path, ``file:/``, ``dbfs:/``,
    ``/dbfs/``, ``/Volumes/...``, or a URI pyarrow opens (``s3://``, ``gs://``, ``abfss://``, ``hdfs://``; endpoints
    and credentials as :func:`spark_mnist.fs.filesystem` takes them).  Where: anywhere (driver, ranks, side tools).

    Returns:
        The :class:`Dataset`: split files, image shape, classes, rows, the pyarrow file system.
    Raises:
        DatasetNotFoundError: no manifest (nothing ingested there, or the first ingest still running), an
            unreadable manifest, a schema version this package cannot read (version 1: one line saying to
            re-ingest), or a named file missing or of another size (the message names the file).
        SourceError: a place no file system here reaches (:func:`spark_mnist.fs.filesystem`), or a store that
            fails to answer (the message names the manifest and pyarrow's error).
    """
    location = normalize_uri(path)
    filesystem, root = fs.filesystem(location)
    root = root.rstrip("/") or root
    where = location.join(MANIFEST_NAME).shown
    try:
        manifest = read_manifest(filesystem, root, where)
    except OSError as e:  # the store answered with an error, or not at all: one line, naming the place
        raise SourceError(f"{where}: cannot read the manifest ({redact(str(e))})") from None
    if manifest is None:
        raise DatasetNotFoundError(
            f"{where}: no manifest, so no complete dataset here; run `spark-mnist ingest "
            f"--output {redact(os.fspath(path))}` first"
        )
    files = manifest.files()
    for shard, info in zip(files, filesystem.get_file_info([f"{root}/{f.path}" for f in files])):
        uri = location.join(*shard.path.split("/")).shown
        if info.size != shard.bytes:  # a size of None: nothing there (or a directory), no file of the manifest's
            raise DatasetNotFoundError(
                f"{uri}: missing; the manifest names it ({shard.bytes} bytes): the dataset was removed or replaced "
                "under the reader, re-run ingest or reopen it"
                if info.size is None
                else f"{uri}: {info.size} bytes, the manifest says {shard.bytes}: the file was changed after the "
                "ingest; re-run ingest"
            )
    return Dataset(location, manifest, filesystem, root)
