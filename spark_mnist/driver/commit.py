"""The commit of an ingest, on the driver: staging beside ``OUT``, the scratch files of killed task attempts,
the rename into place that replaces a previous dataset, and :func:`recover` after an interrupted commit.

Readers see either the previous complete dataset or the new one, never a mix: exactly so where a rename is atomic
(local disk, the ``/dbfs`` and ``/Volumes`` FUSE mounts, HDFS); on object stores a rename is a copy then a delete
(:mod:`spark_mnist.fs`).  No Spark session here: every file operation goes through :mod:`spark_mnist.fs`.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import uuid

from spark_mnist import fs
from spark_mnist.datasets import SPLITS
from spark_mnist.paths import Location
from spark_mnist.shards import contract

log = logging.getLogger(__name__)

COMMIT_RETRIES = 20
# The hidden name a task attempt writes a shard under before moving it into place (:func:`scratch_name`).
SCRATCH_NAME = ".{shard}.attempt-{attempt}"


def staging_for(output: Location) -> Location:
    """A new staging directory beside ``output``, with a traceable name: ``.OUT.staging-<uuid>``."""
    return output.sibling(f".{output.name}.staging-{uuid.uuid4().hex[:12]}")


def scratch_name(shard: str, attempt: object) -> str:
    """The hidden name under which task attempt ``attempt`` writes the shard file named ``shard``
    (:func:`write_shard`), e.g. ``.part-00003.parquet.attempt-17``."""
    return SCRATCH_NAME.format(shard=shard, attempt=attempt)


def is_scratch_name(name: str) -> bool:
    """Whether ``name`` is a :func:`scratch_name` of some shard and attempt."""
    return fnmatch.fnmatchcase(name, scratch_name("*", "*"))


def remove_scratch(staging: Location) -> int:
    """Delete every file in ``staging/<split>/`` named like a task attempt's scratch file (:func:`is_scratch_name`):
    what attempts killed outright (executor lost, SIGKILL) left behind.  The shards themselves are untouched.

    Returns:
        How many files were removed.
    Raises:
        OSError: a split directory could not be listed or a file in it removed.
        SourceError: ``staging`` is on no file system this machine can reach (:func:`spark_mnist.fs.filesystem`).
    """
    removed = 0
    for split in SPLITS:
        directory = staging.join(split)
        leftovers = [name for name in fs.list_names(directory) if is_scratch_name(name)]
        for name in leftovers:
            fs.delete(directory.join(name))
        if leftovers:
            log.info("%s: removed %d scratch file(s) left by killed task attempts: %s", directory.uri,
                     len(leftovers), ", ".join(leftovers))
        removed += len(leftovers)
    log.debug("%s: %d scratch file(s) removed before the commit", staging.uri, removed)
    return removed


def commit(staging: Location, output: Location) -> None:
    """Make the complete dataset in ``staging`` appear as ``output``, replacing what was there.

    First the scratch files of killed task attempts are removed from ``staging`` (:func:`remove_scratch`), so
    ``output`` holds only the shards and the manifest.  A previous dataset is then moved aside (``.OUT.old-*``),
    ``staging`` renamed into place, and the old one deleted.  Concurrent ingests into one ``output`` each retry
    until their rename lands, so the last to commit wins and ``output`` always holds one complete dataset.  If the
    process dies between the two renames, :func:`recover` (run at the start of every ingest) puts the previous
    dataset back.

    Raises:
        RuntimeError: the rename did not land in :data:`COMMIT_RETRIES` attempts (concurrent ingests).
        OSError: a scratch file could not be removed, or a rename failed.
        SourceError: ``staging`` or ``output`` is on no file system this machine can reach.
    """
    remove_scratch(staging)
    for _ in range(COMMIT_RETRIES):
        try:
            fs.rename(staging, output)
            break
        except FileExistsError:
            aside = output.sibling(f".{output.name}.old-{uuid.uuid4().hex[:12]}")
            try:
                fs.rename(output, aside)
            except (FileNotFoundError, FileExistsError):
                continue  # another ingest moved it first
            fs.delete(aside)
    else:
        raise RuntimeError(f"{output.uri}: could not commit after {COMMIT_RETRIES} attempts (concurrent ingests?)")


def recover(output: Location) -> None:
    """Undo an interrupted :func:`commit`: when ``output`` is missing but a complete dataset was moved aside, move
    it back.  Only local paths (local disk, ``/dbfs``, ``/Volumes``) are checked; elsewhere this is a no-op.

    Raises:
        OSError: the parent directory could not be listed or the rename back failed.
    """
    if not output.is_local or fs.exists(output):
        return
    parent = output.sibling("")
    prefix = f".{output.name}.old-"
    aside = sorted((e for e in os.scandir(parent.local_path) if e.name.startswith(prefix)),
                   key=lambda e: e.stat().st_mtime, reverse=True) if os.path.isdir(parent.local_path) else []
    for entry in aside:
        if os.path.exists(os.path.join(entry.path, contract.MANIFEST_NAME)):
            log.warning("%s: restoring the previous dataset left aside by an interrupted ingest", output.uri)
            os.rename(entry.path, output.local_path)
            return
