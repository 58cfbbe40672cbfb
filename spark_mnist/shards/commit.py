"""The commit of a dataset: its manifest, written last in one single-object write, is what makes a generation's
files a dataset; the lease that tells a live ingest's generation from a dead one's; retention and clean-up of the
generations no manifest needs any more.  docs/concepts/dataset.md ("The manifest is the commit") is the protocol's
one description, its windows included; in short:

1. an ingest picks a new generation (:func:`new_generation`) and holds its :class:`Lease`,
   ``OUT/<generation>/_lease/lease.json``, rewritten every :data:`HEARTBEAT_S` while the ingest lives (:func:`writing`);
2. it writes every shard under ``OUT/<generation>/`` by its final name;
3. :func:`publish` writes ``OUT/_manifest.json`` naming that generation, in one atomic single-object write
   (:func:`spark_mnist.fs.write_whole`), then ends the lease;
4. :func:`clean` keeps the generation the manifest names and its ``previous``, and deletes every other one whose
   lease stayed unchanged for :data:`LEASE_EXPIRY_S` (or has none), lease first, so a stalled owner is reaped
   (:class:`~spark_mnist.errors.ReapedError`).

No directory is renamed anywhere; no Spark here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Iterator

from spark_mnist import fs
from spark_mnist.errors import DatasetNotFoundError, ReapedError
from spark_mnist.paths import Location
from spark_mnist.shards.contract import MANIFEST_NAME, Manifest, read_manifest

__all__ = ["LEASE_DIR", "LEASE_NAME", "HEARTBEAT_S", "LEASE_EXPIRY_S", "STALE_TEMP_S", "Lease", "new_generation",
           "is_generation", "current_manifest", "read_lease", "writing", "publish", "clean", "discard"]  # fmt: skip

log = logging.getLogger(__name__)

# The lease of a generation being written (:class:`Lease`): its first object, ``LEASE_DIR/LEASE_NAME`` under the
# generation; readers ignore it, as every file no manifest names.  The lease has a folder of its own so that ending or
# reaping it deletes a folder, never a single object: pyarrow's AzureFileSystem deletes a single blob of a flat
# namespace under a blob lease that it releases after the delete, and that release has hung on its answer until the
# client's 60 s timeout and aborted processes (apache/arrow GH-44286); a folder's deletion takes no blob lease.
LEASE_DIR = "_lease"
LEASE_NAME = "lease.json"
# Seconds between two beats of a lease (its rewrite with the beat counter incremented).
HEARTBEAT_S = 1.0
# Seconds a lease must stay unchanged before :func:`clean` takes its ingest for dead (five missed beats: a live
# ingest on a loaded machine still beats).  Tests set these module attributes lower; nothing else should.
LEASE_EXPIRY_S = 5.0
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
        return read_manifest(filesystem, root.rstrip("/"), out.join(MANIFEST_NAME).shown)
    except DatasetNotFoundError as e:
        log.info("%s: replacing what is there (%s)", out.shown, e)
        return None


class Lease:
    """The lease of one ingest on its generation: ``OUT/<generation>/_lease/lease.json`` (:data:`LEASE_DIR`), JSON
    ``{"host", "pid", "generation", "beat", "time"}`` (``time`` UTC, ISO 8601), so a leftover tells who left it.

    Entering writes it (the generation's first object) and starts a daemon thread that rewrites it every
    :data:`HEARTBEAT_S` with ``beat`` incremented; :func:`clean` takes a lease that stayed unchanged for
    :data:`LEASE_EXPIRY_S` for a dead ingest's.  Before each beat the thread checks that the lease still holds its
    own last content: where it is gone (or changed), a clean-up reaped the generation, so :attr:`reaped` is set and
    the thread stops, never writing it again.  Exiting stops the thread (and joins it); :func:`publish` ends the
    lease after its manifest write.  Where: the driver (or the one process of
    :func:`spark_mnist.shards.arrays.write_local_dataset`).

    Example::

        with Lease(out, generation) as lease:
            ...  # write the shards
            publish(out, manifest, lease)

    Raises:
        OSError: (on entering) the lease could not be written.
    """

    def __init__(self, out: Location, generation: str):
        self.out, self.generation = out, generation
        self.location = _lease_location(out, generation)
        self.reaped = False
        self.published = False  # set by publish once the manifest naming this generation is written
        self._beat = 0
        self._last: bytes | None = None
        self._lock = threading.Lock()  # a beat's check-and-write against publish's check
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{generation}", daemon=True)

    def __enter__(self) -> "Lease":
        if self.out.is_local:
            fs.makedirs(_lease_folder(self.out, self.generation))  # object stores have none: the lease makes them
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the heartbeat (idempotent); the lease object stays (:meth:`release` deletes its folder)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease's folder: the generation is published (or discarded).

        Raises:
            OSError: the lease could not be deleted.
        """
        self.stop()
        fs.delete(_lease_folder(self.out, self.generation))

    def holds(self) -> bool:
        """Whether the lease is still this ingest's: not reaped, and the object holds what it last wrote.

        Raises:
            OSError: the store failed.
        """
        with self._lock:
            if not self.reaped and read_lease(self.location) != self._last:
                self.reaped = True
            return not self.reaped

    def _write(self) -> None:
        self._beat += 1
        data = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "generation": self.generation,
                "beat": self._beat,
                "time": datetime.now(timezone.utc).isoformat(),
            }
        ).encode("utf-8")
        fs.write_whole(self.location, data)
        self._last = data

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                with self._lock:
                    if self._stop.is_set():
                        return
                    if read_lease(self.location) != self._last:
                        self.reaped = True
                        log.warning(
                            "%s: the lease is gone: another ingest's clean-up took this ingest for dead "
                            "and removed its generation",
                            self.location.shown,
                        )
                        return
                    self._write()
            except OSError as e:  # a missed beat; LEASE_EXPIRY_S allows several
                log.warning("%s: could not renew the lease (%s)", self.location.shown, e)


@contextlib.contextmanager
def writing(out: Location) -> Iterator[Lease]:
    """Begin an ingest into ``out``: pick a new generation (:func:`new_generation`, after the current one) and hold
    its :class:`Lease` while the body writes it and calls :func:`publish`.  Where the body fails before the manifest
    is written, the lease's heartbeat is stopped and the generation discarded (with ``out`` itself where this
    created it and nothing else is there), so ``out`` goes on holding what it held.  Where: the driver.

    Example::

        with writing(out) as lease:
            ...  # write the shards under out/<lease.generation>/
            publish(out, manifest, lease)

    Raises:
        SourceError: ``out`` is on no file system this machine reaches.
        OSError: the lease could not be written.
    """
    created_out = not fs.exists(out)
    current = current_manifest(out)
    lease = Lease(out, new_generation(after=current.generation if current is not None else None))
    try:
        with lease:
            yield lease
    except BaseException:
        lease.stop()
        if not lease.published:
            discard(out, lease.generation, created_out=created_out)
        raise


def _lease_location(out: Location, generation: str) -> Location:
    """Where the lease of ``generation`` under ``out`` lives: ``OUT/<generation>/_lease/lease.json``."""
    return _lease_folder(out, generation).join(LEASE_NAME)


def _lease_folder(out: Location, generation: str) -> Location:
    """The folder of the lease of ``generation`` under ``out`` (:data:`LEASE_DIR`), deleted whole."""
    return out.join(generation, LEASE_DIR)


def read_lease(location: Location) -> bytes | None:
    """The content of the lease object at ``location``, or ``None`` where there is none.

    Raises:
        OSError: the store failed.
    """
    try:
        return fs.read_bytes(location)
    except FileNotFoundError:
        return None
    except OSError:
        if not fs.exists(location):  # a store that words "not found" otherwise
            return None
        raise


def publish(out: Location, manifest: Manifest, lease: Lease) -> Manifest:
    """Commit ``manifest`` (its generation fully written under ``out``, held by ``lease``): write
    ``out/_manifest.json`` naming the manifest ``out`` holds now as its ``previous``, in one single-object write;
    then end the lease and :func:`clean`.  The last manifest write wins: whatever another ingest published
    meanwhile is replaced.  Failures after the manifest's write (ending the lease, the clean-up) are logged and left
    to the next ingest: the dataset is committed.

    Returns:
        The manifest written: ``manifest`` with ``previous`` set.
    Raises:
        ReapedError: another ingest's clean-up found the lease silent for :data:`LEASE_EXPIRY_S` and removed this
            generation; nothing was published (``out`` holds what that ingest published).
        SourceError: ``out`` is on no file system this machine reaches.
        OSError: the manifest could not be written (``out`` then still holds the previous dataset).
    """
    current = current_manifest(out)
    manifest = dataclasses.replace(manifest, previous=current.generation if current is not None else None)
    if not lease.holds():
        raise ReapedError(
            f"{out.shown}: generation {manifest.generation} was removed by another ingest's "
            f"clean-up, which found its lease ({LEASE_DIR}/{LEASE_NAME}) silent for "
            f"{LEASE_EXPIRY_S:g} s (this ingest stalled); nothing was published, {out.shown} keeps "
            f"what it holds: ingest again"
        )
    fs.write_whole(out.join(MANIFEST_NAME), manifest.to_json().encode("utf-8"))
    lease.published = True
    log.info("%s: published generation %s", out.shown, manifest.generation)
    try:
        lease.release()
        clean(out)
    except OSError as e:
        log.warning(
            "%s: generation %s is published, but the clean-up failed (%s); the next ingest tries again",
            out.shown,
            manifest.generation,
            e,
        )
    return manifest


def clean(out: Location) -> list[str]:
    """Apply the retention rule (module docstring) to ``out``: delete every generation other than the current
    manifest's and the one it replaced, unless its lease is alive, and the temporary files of manifests whose ingest
    was killed before its ``os.replace`` (:func:`spark_mnist.fs.replacing`; older than :data:`STALE_TEMP_S`).

    Where any of those generations has a lease, waits :data:`LEASE_EXPIRY_S` once and reads the leases again: a
    changed one's generation stays (its ingest is writing).  Then reads the manifest again and keeps what it names
    (an ingest that published meanwhile); deletes each remaining generation's lease first, then the generation.
    A deletion that fails is logged and left to the next ingest (the dataset is committed already); one that a
    racing ingest's clean-up did meanwhile is no failure.

    Returns:
        The generations deleted.
    Raises:
        OSError: ``out`` could not be listed, or its manifest or a lease read.
    """
    current = current_manifest(out)
    if current is None:
        return []
    names = fs.list_names(out)
    candidates = [name for name in names if is_generation(name) and name not in (current.generation, current.previous)]
    leases = {name: read_lease(_lease_location(out, name)) for name in candidates}
    held = {name: content for name, content in leases.items() if content is not None}
    if held:
        time.sleep(LEASE_EXPIRY_S)
        alive = [
            name for name, content in held.items() if read_lease(_lease_location(out, name)) not in (None, content)
        ]
        if alive:
            log.info(
                "%s: left generation(s) %s, whose ingest is still writing (its lease beats)",
                out.shown,
                ", ".join(alive),
            )
        candidates = [name for name in candidates if name not in alive]
    current = current_manifest(out)  # an ingest that published meanwhile (its lease gone after its manifest write)
    if current is None:
        return []
    removed = []
    for name in candidates:
        if name in (current.generation, current.previous):
            continue
        if (name not in held or _remove(_lease_folder(out, name))) and _remove(out.join(name)):
            removed.append(name)
    for name in names:  # a manifest's temporary file, left by an ingest killed before its os.replace
        if name.startswith(f".{MANIFEST_NAME}.tmp-") and _age_s(out.join(name)) > STALE_TEMP_S:
            _remove(out.join(name))
    if removed:
        log.info("%s: removed %d generation(s) no manifest needs: %s", out.shown, len(removed), ", ".join(removed))
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
    log.warning("%s: could not remove it (%s); the next ingest tries again", location.shown, error)
    return False


def _age_s(location: Location) -> float:
    """Seconds since ``location`` (a local or FUSE file: temporary files exist nowhere else) was last modified;
    0 where it is gone or not local."""
    try:
        return time.time() - os.stat(location.os_path).st_mtime if location.os_path is not None else 0.0
    except OSError:
        return 0.0


def discard(out: Location, generation: str, *, created_out: bool = False) -> None:
    """Remove the files of an ingest that will not publish (bad input found late, a failed write job, a reaped
    generation; the caller has stopped its lease's heartbeat, which could write the lease again); with
    ``created_out``, also ``out`` itself where the ingest created it and nothing else is there, so a failed first
    ingest leaves nothing behind.

    Raises:
        OSError: the generation could not be deleted.
    """
    fs.delete(out.join(generation))
    if created_out and not fs.list_names(out):
        if out.os_path is not None:
            try:
                os.rmdir(out.os_path)
            except OSError:  # something appeared meanwhile (a racing ingest): it stays
                pass
        else:
            fs.delete(out)
