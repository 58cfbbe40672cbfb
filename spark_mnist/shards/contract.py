"""The shard contract between ingest (writer, driver) and the loader (reader, every rank).

An ingested dataset directory ``OUT`` holds::

    OUT/_manifest.json        written last; its presence marks a complete dataset
    OUT/train/part-NNNNN.parquet
    OUT/test/part-NNNNN.parquet

Each Parquet shard has the columns below, rows in ascending ``index`` order, shard k holding the k-th contiguous
range of the source file.  ``image`` is the raw pixels, row-major (H x W), uint8, exactly ``H*W`` bytes per row.
Any change to this layout bumps :data:`SCHEMA_VERSION`.  No Spark and no torch here.
"""

from __future__ import annotations

import json
import os
from typing import Any

from spark_mnist.errors import DatasetNotFoundError, check_choice

SCHEMA_VERSION = 1
MANIFEST_NAME = "_manifest.json"
INDEX, IMAGE, LABEL = "index", "image", "label"
COLUMNS = (INDEX, IMAGE, LABEL)
# Column -> (Spark SQL type, Arrow type name): long, binary, int.
COLUMN_TYPES = {INDEX: ("bigint", "int64"), IMAGE: ("binary", "binary"), LABEL: ("int", "int32")}


def shard_name(k: int) -> str:
    """The file name of shard ``k`` of a split."""
    return f"part-{k:05d}.parquet"


def load_manifest(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``_manifest.json`` of an ingested dataset on a local (or FUSE-mounted) path.

    Returns:
        The manifest as a dict (see ``ingest.build_manifest`` for its keys).
    Raises:
        DatasetNotFoundError: no manifest (nothing ingested there, or an ingest still running), unreadable JSON, or
            a schema version this package cannot read.
    """
    path = os.path.join(os.fspath(dataset_dir), MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError as e:
        raise DatasetNotFoundError(
            f"{path}: no manifest, so no complete dataset here; run `spark-mnist ingest --output {dataset_dir}` first"
        ) from e
    except json.JSONDecodeError as e:
        raise DatasetNotFoundError(f"{path}: unreadable manifest ({e})") from e
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DatasetNotFoundError(
            f"{path}: schema version {version!r}, this package reads version {SCHEMA_VERSION}; re-run ingest"
        )
    return manifest


def split_files(dataset_dir: str | os.PathLike, manifest: dict[str, Any], split: str) -> list[str]:
    """Local paths of the Parquet shards of ``split``, in shard order, as the manifest lists them.

    Raises:
        ValueError: ``split`` is not one of the manifest's splits.
    """
    check_choice("split", split, manifest["splits"])
    return [os.path.join(os.fspath(dataset_dir), split, name) for name in manifest["splits"][split]["files"]]
