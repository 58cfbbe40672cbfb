"""The commit of a dataset: its manifest, written last in one single-object write, is what makes a generation's
files a dataset; retention and clean-up of the generations no manifest needs any more.

The protocol, the same on local disk, FUSE mounts (``/dbfs``, ``/Volumes``) and object stores, with no rename of a
directory anywhere (the pattern of Mosaic Streaming's ``index.json``, TFDS's ``dataset_info.json``, Delta's log):

1. an ingest picks a new generation (:func:`new_generation`: its UTC start time and a uuid, so names sort by
   start and a leftover tells when it was made) and writes every shard under ``OUT/<generation>/`` by its final
   name; no reader looks there, since no manifest names it;
2. :func:`publish` writes ``OUT/_manifest.json`` naming that generation and every file, once, in one atomic
   single-object write (:func:`spark_mnist.fs.write_whole`: one PUT on object stores, a temporary file and
   ``os.replace`` on POSIX, a whole-file write where a mount refuses rename).  Until that write lands readers see
   the previous manifest and its files, which nothing has touched; after it, the new ones;
3. :func:`clean` then applies the retention rule.

Retention rule: ``OUT`` keeps the generation its manifest names and the one that manifest replaced
(``previous``), so a reader that opened the previous manifest goes on reading its files.  Every other directory
named like a generation and older than the current one is deleted by the next ingest that publishes: earlier
datasets, generations of ingests that were killed or failed, and the losers of racing ingests.  Nothing else under
``OUT`` is touched (an old layout's ``train/`` and ``test/``, a user's own files).

Racing ingests into one ``OUT``: the ingest that started last wins.  An ingest about to publish reads the current
manifest first; when it names a generation that started later, this ingest's generation is discarded and the
current dataset stays (:func:`publish` returns it).  So a generation older than the current one cannot be
published any more, except by an ingest that read the manifest before the current one was written and has not
written its own yet (its read-then-write takes milliseconds; on a loaded machine, more).  That ingest's generation
is newer than the one the current manifest replaced, so :func:`clean` treats those generations apart: before it
deletes one, it waits :data:`SETTLE_S` and reads the manifest again, and deletes only what is still unnamed and
older than the manifest then current.  An ingest that wrote meanwhile has won (its files are all there; the
generation it replaced is kept as its ``previous`` or, being newer, left to the next ingest).  The window left: an
ingest that stalls for more than :data:`SETTLE_S` between its read and its write, or two other ingests that both
publish inside it.

SIGKILL at any moment leaves ``OUT`` with the previous complete dataset (the kill came before the manifest's
write landed) or the new one (after); the next ingest removes what the killed one left.  No Spark here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from spark_mnist import fs
from spark_mnist.errors import DatasetNotFoundError
from spark_mnist.paths import Location
from spark_mnist.shards.contract import MANIFEST_NAME, Manifest, read_manifest

if TYPE_CHECKING:
    from spark_mnist.datasets import DatasetSpec

log = logging.getLogger(__name__)

# Seconds :func:`clean` waits before deleting a generation that an ingest may be about to publish (module docstring).
SETTLE_S = 1.0
# Age in seconds past which a manifest's temporary file (:func:`spark_mnist.fs.replacing`) counts as a killed
# ingest's: a younger one may be a racing ingest's, between its write and its os.replace.
STALE_TEMP_S = 60.0

GENERATION_TIME = "%Y%m%dT%H%M%S%fZ"
GENERATION_PATTERN = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{12}$")


def new_generation(after: str | None = None) -> str:
    """A new generation name, ``<UTC time, microseconds>Z-<12 hex digits>``, e.g.
    ``20261203T141352123456Z-3f2a9c01b7d4``; later than ``after`` (the current manifest's generation) even where
    this machine's clock is behind the one that wrote it, so names sort by start."""
    now = datetime.now(timezone.utc)
    if after is not None and GENERATION_PATTERN.match(after):
        previous = datetime.strptime(after.split("-", 1)[0], GENERATION_TIME).replace(tzinfo=timezone.utc)
        now = max(now, previous + timedelta(microseconds=1))
    return f"{now.strftime(GENERATION_TIME)}-{uuid.uuid4().hex[:12]}"


def is_generation(name: str) -> bool:
    """Whether ``name`` is a :func:`new_generation` name."""
    return GENERATION_PATTERN.match(name) is not None


def current_manifest(out: Location) -> Manifest | None:
    """The manifest ``OUT`` holds now, or ``None`` where there is none or one this package does not read (an
    earlier schema, unreadable: a new ingest replaces it).

    Raises:
        SourceError: ``out`` is on no file system this machine reaches (:func:`spark_mnist.fs.filesystem`).
        OSError: the store failed.
    """
    filesystem, root = fs.filesystem(out)
    try:
        return read_manifest(filesystem, root.rstrip("/"), out.join(MANIFEST_NAME).display)
    except DatasetNotFoundError as e:
        log.info("%s: replacing what is there (%s)", out.display, e)
        return None


def publish(out: Location, manifest: Manifest) -> Manifest:
    """Commit ``manifest`` (its generation fully written under ``out``): write ``out/_manifest.json`` in one
    single-object write, then :func:`clean`.

    Returns:
        The manifest ``out`` holds afterwards: ``manifest`` with ``previous`` set to the generation it replaced; or,
        where an ingest that started later has published meanwhile, that ingest's manifest (this generation is then
        discarded and a warning logged: the last to start wins).
    Raises:
        SourceError: ``out`` is on no file system this machine reaches.
        OSError: the manifest could not be written (``out`` then still holds the previous dataset).
    """
    current = current_manifest(out)
    if current is not None and current.generation > manifest.generation:
        log.warning("%s: an ingest that started later published generation %s meanwhile; it stays, and this "
                    "ingest's generation %s is discarded", out.display, current.generation, manifest.generation)
        discard(out, manifest.generation)
        return current
    manifest = dataclasses.replace(manifest, previous=current.generation if current is not None else None)
    fs.write_whole(out.join(MANIFEST_NAME), manifest.to_json().encode("utf-8"))
    log.info("%s: published generation %s", out.display, manifest.generation)
    clean(out)
    return manifest


def clean(out: Location) -> list[str]:
    """Apply the retention rule (module docstring) to ``out``: delete every generation older than the current
    manifest's other than the one it replaced, and the temporary files of manifests whose ingest was killed before
    its ``os.replace`` (:func:`spark_mnist.fs.replacing`; older than :data:`STALE_TEMP_S`).  Reads the manifest
    again, so a racing ingest's newer manifest is what counts; where a generation to delete is newer than the one
    the current manifest replaced (an ingest may be about to publish it), waits :data:`SETTLE_S` and reads it once
    more first.  A deletion that fails is logged and left to the next ingest (the dataset is committed already); one
    that a racing ingest's clean-up did meanwhile is no failure.

    Returns:
        The generations deleted.
    Raises:
        OSError: ``out`` could not be listed, or its manifest read.
    """
    current = current_manifest(out)
    if current is None:
        return []
    names = fs.list_names(out)
    removed = _unneeded(names, current)
    if any(current.previous is None or name > current.previous for name in removed):
        time.sleep(SETTLE_S)  # an ingest that read the manifest before ours was written may be writing its own
        current = current_manifest(out)
        if current is None:
            return []
        removed = _unneeded(names, current)
    removed = [name for name in removed if _remove(out.join(name))]
    for name in names:  # a manifest's temporary file, left by an ingest killed before its os.replace
        if name.startswith(f".{MANIFEST_NAME}.tmp-") and _age_s(out.join(name)) > STALE_TEMP_S:
            _remove(out.join(name))
    if removed:
        log.info("%s: removed %d generation(s) no manifest needs: %s", out.display, len(removed), ", ".join(removed))
    return removed


def _remove(location: Location) -> bool:
    """Delete ``location`` for :func:`clean`; ``False`` (and a warning) where it could not be and is still there.
    Two racing ingests' clean-ups may delete the same generation: the store then refuses the second one's deletes
    of what the first removed (Azure: "Failed to delete blobs"), so a failure is retried once before it counts."""
    for attempt in range(2):
        try:
            fs.delete(location)
            return True
        except OSError as e:
            error = e
        try:
            if not fs.exists(location):
                return True
        except OSError:
            pass
        if attempt == 0:
            time.sleep(0.1)
    log.warning("%s: could not remove it (%s); the next ingest tries again", location.display, error)
    return False


def _age_s(location: Location) -> float:
    """Seconds since ``location`` (a local or FUSE file: temporary files exist nowhere else) was last modified;
    0 where it is gone or not local."""
    try:
        return time.time() - os.stat(location.local_path).st_mtime if location.is_local else 0.0
    except OSError:
        return 0.0


def _unneeded(names: list[str], current: Manifest) -> list[str]:
    """The generations among ``names`` that the retention rule deletes under ``current``."""
    keep = {current.generation, current.previous}
    return [name for name in names if is_generation(name) and name not in keep and name < current.generation]


def discard(out: Location, generation: str, *, created_out: bool = False) -> None:
    """Remove the files of an ingest that will not publish (bad input found late, a failed write job, a superseded
    generation); with ``created_out``, also ``out`` itself where the ingest created it and nothing else is there,
    so a failed first ingest leaves nothing behind.

    Raises:
        OSError: the generation could not be deleted.
    """
    fs.delete(out.join(generation))
    if created_out and not fs.list_names(out):
        if out.is_local:
            try:
                os.rmdir(out.local_path)
            except OSError:  # something appeared meanwhile (a racing ingest): it stays
                pass
        else:
            fs.delete(out)


def write_local_dataset(output: str | os.PathLike, spec: "DatasetSpec", arrays: dict[str, tuple], *,
                        num_shards: int = 1, rows_per_group: int | None = None,
                        source: dict | None = None) -> Manifest:
    """Write ``arrays`` (``{split: (images (n, H, W) uint8, labels (n,))}``) as a dataset of ``spec`` at ``output``
    (any spelling :func:`spark_mnist.paths.normalize_uri` accepts, object stores included) without Spark: the same
    files and protocol as ingest, ``num_shards`` contiguous shards per split under a new generation by the
    task-side writer, then :func:`publish`.  For the test kit (:mod:`spark_mnist.testing`), small tools and the
    store tests.  Where: one process.

    Args:
        rows_per_group: rows per Parquet row group; default about
            :data:`~spark_mnist.shards.contract.ROW_GROUP_BYTES` of images.
    Returns:
        The manifest published (as :func:`publish`).
    Raises:
        OSError: a shard or the manifest could not be written (the generation is then discarded).
    """
    import numpy as np

    from spark_mnist import __version__
    from spark_mnist.paths import normalize_uri
    from spark_mnist.shards.contract import ROW_GROUP_BYTES, ShardFile, Split, shard_bounds, shard_path
    from spark_mnist.shards.parquet import write_shard

    out = normalize_uri(output)
    image_shape = tuple(int(n) for n in spec.image_shape)
    rows_per_group = rows_per_group or max(1, ROW_GROUP_BYTES // int(np.prod(image_shape)))
    current = current_manifest(out)
    generation = new_generation(after=current.generation if current is not None else None)
    created_out = not fs.exists(out)
    try:
        splits = {}
        for name, (images, labels) in arrays.items():
            bounds = shard_bounds(len(labels), num_shards)
            files = []
            for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                path = shard_path(generation, name, k)
                size = write_shard(out.display, path, images[lo:hi], labels[lo:hi], int(lo), rows_per_group)
                files.append(ShardFile(path, size, int(hi - lo)))
            splits[name] = Split(rows=len(labels), files=tuple(files), label_histogram=tuple(
                np.bincount(np.asarray(labels, dtype=np.int64), minlength=spec.num_classes).tolist()))
        manifest = Manifest(generation=generation, dataset=spec.name, classes=tuple(spec.classes),
                            image_shape=image_shape, splits=splits, source=source or {}, package_version=__version__)
    except BaseException:
        discard(out, generation, created_out=created_out)
        raise
    return publish(out, manifest)
