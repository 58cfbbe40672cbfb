"""The commit of a dataset: its manifest, written last in one single-object write, is what makes a generation's
files a dataset; retention removes, by age, the generations no manifest names.  docs/concepts/dataset.md ("The
manifest is the commit") is the protocol's one description, its windows included; in short:

1. an ingest picks a new generation (:func:`new_generation`: its name starts with its UTC start time);
2. it writes every shard under ``OUT/<generation>/`` by its final name;
3. :func:`publish` writes ``OUT/_manifest.json`` naming that generation and the one it replaces (``previous``), in
   one atomic single-object write (:func:`spark_mnist.fs.write_whole`), then calls :func:`clean`;
4. :func:`clean` (also ``spark-mnist gc OUT``) deletes every generation the manifest does not name whose start is
   older than :data:`RETENTION_S`, and manifest temporary files as old.

No directory is renamed anywhere, nothing is written but shards and the manifest; no Spark here.
"""

import contextlib
import dataclasses
import logging
import os
import re
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator, Sequence

import numpy as np

from spark_mnist import __version__, fs
from spark_mnist.datasets import DatasetSpec
from spark_mnist.errors import DatasetNotFoundError
from spark_mnist.paths import Location
from spark_mnist.shards.contract import MANIFEST_NAME, Manifest, ShardFile, Split, read_manifest

__all__ = ["RETENTION_S", "Ingest", "new_generation", "generation_start", "current_manifest", "writing", "publish",
           "clean"]  # fmt: skip

log = logging.getLogger(__name__)

# Seconds after its start past which a generation that no manifest names is a dead ingest's, for clean (and the
# longest an ingest may take to publish).  An MNIST-family ingest takes seconds to minutes: a day leaves every live
# one alone, on any clock, and bounds a killed one's files to a day.  Tests set it lower; nothing else should.
RETENTION_S = 24 * 3600.0

GENERATION_TIME = "%Y%m%dT%H%M%S%fZ"
# ``<time>_<hex>``: this release's names.  ``<time>-<hex>``: the previous release's (the lease protocol), whose
# clean-up deletes only those, so it never sees this release's generations; this release deletes either by age.
GENERATION_PATTERN = re.compile(r"^(\d{8}T\d{12}Z)[_-][0-9a-f]{12}$")


def new_generation(after: str | None = None) -> str:
    """A new generation name, ``<UTC time, microseconds>Z_<12 hex digits>``, e.g.
    ``20261203T141352123456Z_3f2a9c01b7d4``; later than ``after`` (the current manifest's generation) even where
    this machine's clock is behind the one that wrote it, so names sort by start."""
    previous = generation_start(after or "") or datetime.min.replace(tzinfo=timezone.utc)
    now = max(datetime.now(timezone.utc), previous + timedelta(microseconds=1))
    return f"{now.strftime(GENERATION_TIME)}_{uuid.uuid4().hex[:12]}"


def generation_start(name: str) -> datetime | None:
    """The UTC start time in a generation's name (this release's or the previous one's), ``None`` for another name
    (so also the test of whether ``name`` is a generation's)."""
    match = GENERATION_PATTERN.match(name)
    return datetime.strptime(match[1], GENERATION_TIME).replace(tzinfo=timezone.utc) if match else None


def _age_s(generation: str) -> float:
    started = generation_start(generation)
    return (datetime.now(timezone.utc) - started).total_seconds() if started is not None else 0.0


def current_manifest(out: Location) -> Manifest | None:
    """The manifest ``OUT`` holds now, or ``None`` where there is none or one this package does not read (an
    earlier schema, unreadable: a new ingest replaces it).

    Raises:
        SourceError: ``out`` is on no file system this machine reaches (:func:`spark_mnist.fs.filesystem`).
        OSError: the store failed.
    """
    try:
        return read_manifest(*fs.filesystem(out), out.join(MANIFEST_NAME).shown)
    except DatasetNotFoundError as e:
        log.info("%s: replacing what is there (%s)", out.shown, e)
        return None


@dataclasses.dataclass
class Ingest:
    """One ingest's new generation (:func:`writing`); ``published`` once :func:`publish` wrote the manifest naming
    it."""

    generation: str
    published: bool = False


@contextlib.contextmanager
def writing(out: Location) -> Iterator[Ingest]:
    """Begin an ingest into ``out``: pick a new generation (:func:`new_generation`, after the current one) for the
    body to write and :func:`publish`.  Where the body fails before the manifest is written, the generation is
    discarded (with ``out`` itself where this created it and nothing else is there), so ``out`` goes on holding
    what it held.  Where: the driver.

    Example::

        with writing(out) as ingest:
            ...  # write the shards under out/<ingest.generation>/
            publish(out, ingest, spec, labels, files, source)

    Raises:
        SourceError: ``out`` is on no file system this machine reaches.
        OSError: the store failed.
    """
    created_out = not fs.exists(out)
    current = current_manifest(out)
    ingest = Ingest(new_generation(after=current.generation if current is not None else None))
    try:
        yield ingest
    except BaseException:
        if not ingest.published:  # nothing of it is visible: its files go, and ``out`` where this created it
            fs.delete(out.join(ingest.generation))
            if created_out and not fs.list_names(out):
                if out.os_path is not None:
                    with contextlib.suppress(OSError):  # something appeared meanwhile (a racing ingest): it stays
                        os.rmdir(out.os_path)
                else:
                    fs.delete(out)
        raise


def publish(
    out: Location, ingest: Ingest, spec: DatasetSpec, labels: dict[str, Any], files: Sequence[ShardFile], source: dict
) -> Manifest:
    """Commit the generation ``ingest`` wrote in full under ``out``: write ``out/_manifest.json``, the manifest of a
    dataset of ``spec`` whose splits hold ``labels`` (``{split: labels (n,)}``, for the rows and the label histogram)
    in the shard ``files`` under ``<generation>/<split>/`` (in order), ingested from ``source`` (the manifest's
    ``source``), naming the manifest ``out`` holds now as its ``previous``, in one single-object write; then
    :func:`clean`.  The last manifest write wins: whatever another ingest published meanwhile is replaced.  A failed
    clean-up is logged and left to the next ingest: the dataset is committed.

    Returns:
        The manifest written.
    Raises:
        OSError: the generation started longer than :data:`RETENTION_S` ago, so another ingest's clean-up may have
            removed its files (nothing is published); or the manifest could not be written (``out`` then still
            holds the previous dataset).
        SourceError: ``out`` is on no file system this machine reaches.
    """
    splits = {}
    for name, y in labels.items():
        histogram = np.bincount(np.asarray(y, dtype=np.int64), minlength=spec.num_classes).tolist()
        mine = tuple(f for f in files if f.path.startswith(f"{ingest.generation}/{name}/"))
        splits[name] = Split(len(y), mine, tuple(histogram))
    current = current_manifest(out)
    previous = current.generation if current is not None else None
    classes, shape = tuple(spec.classes), spec.image_shape
    manifest = Manifest(ingest.generation, spec.name, classes, shape, splits, source, previous, __version__)
    if _age_s(ingest.generation) > RETENTION_S:
        raise OSError(
            f"{out.shown}: generation {manifest.generation} started {_age_s(ingest.generation):.0f} s ago, more than "
            f"the retention ({RETENTION_S:g} s) after which another ingest's clean-up removes it; nothing was "
            f"published, {out.shown} keeps what it holds: ingest again"
        )
    fs.write_whole(out.join(MANIFEST_NAME), manifest.to_json().encode("utf-8"))
    ingest.published = True
    log.info("%s: published generation %s", out.shown, manifest.generation)
    try:
        clean(out)
    except OSError as e:
        log.warning("%s: generation %s is published; the clean-up failed (%s)", out.shown, manifest.generation, e)
    return manifest


def clean(out: Location, older_than: float | None = None) -> list[str]:
    """Apply retention to ``out``: delete every generation that the current manifest does not name (as its
    generation or ``previous``) and that started more than ``older_than`` seconds ago (default
    :data:`RETENTION_S`), and the temporary files of manifest writes (:func:`spark_mnist.fs.replacing`) modified as
    long ago.  ``older_than`` shorter than an ingest running now removes that ingest's generation.  A deletion that
    fails is logged and left to the next clean-up; one that a racing clean-up did meanwhile is no failure.

    Returns:
        The generations deleted (none where ``out`` holds no manifest this package reads).
    Raises:
        OSError: ``out`` could not be listed, or its manifest read.
    """
    older_than = RETENTION_S if older_than is None else older_than
    current = current_manifest(out)
    if current is None:
        return []
    kept, removed = (current.generation, current.previous), []
    for name in fs.list_names(out):
        if generation_start(name) and name not in kept and _age_s(name) > older_than and _remove(out.join(name)):
            removed.append(name)
        elif name.startswith(f".{MANIFEST_NAME}.tmp-") and _modified_s_ago(out.join(name)) > older_than:
            _remove(out.join(name))  # a manifest's temporary file, left by an ingest killed before its os.replace
    if removed:
        log.info("%s: removed %d generation(s) no manifest needs: %s", out.shown, len(removed), ", ".join(removed))
    return removed


def _remove(location: Location) -> bool:
    """Delete ``location`` for :func:`clean`; ``False`` (and a warning) where it could not be and is still there.
    Two racing clean-ups may delete the same generation: the store then refuses the second one's deletes of what
    the first removed (Azure: "Failed to delete blobs"), so a failure is retried once before it counts."""
    for attempt in range(2):
        time.sleep(0.1 * attempt)  # before the second try
        try:
            fs.delete(location)
            return True
        except OSError as e:
            error = e
        with contextlib.suppress(OSError):
            if not fs.exists(location):
                return True
    log.warning("%s: could not remove it (%s); the next clean-up tries again", location.shown, error)
    return False


def _modified_s_ago(location: Location) -> float:
    """Seconds since ``location`` (a local or FUSE file: temporary files exist nowhere else) was last modified;
    0 where it is gone or not local."""
    try:
        return time.time() - os.stat(location.os_path).st_mtime if location.os_path is not None else 0.0
    except OSError:
        return 0.0
