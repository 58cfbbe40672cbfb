"""One ingest's write and commit without Spark, in its own process, for the store tests: a dataset whose every pixel
is ``VALUE`` committed to ``OUT`` through the same functions ingest uses (:func:`spark_mnist.shards.commit.
write_local_dataset`: shards under a new generation by their final names, then the manifest, then the clean-up).

``python -m tests.stores.writer OUT VALUE [KILL_POINT]``: with a kill point (:data:`KILL_POINTS`) the process
prints ``PAUSED <point> <pid>`` when it gets there and waits to be SIGKILLed; without one it prints
``DONE <generation>``.  ``python -m tests.stores.writer --serve`` reads such argument lines from stdin and runs each
in a process forked from itself, its imports done once (:class:`Writers` in the tests), so a kill costs no
interpreter start.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from spark_mnist import fs
from spark_mnist.datasets import get_dataset
from spark_mnist.paths import normalize_uri
from spark_mnist.shards import commit, parquet

TRAIN_ROWS, TEST_ROWS, SHARDS, ROWS_PER_GROUP = 40, 20, 2, 8
# Where a kill lands, spread across the write and the commit: (point, function patched, which call pauses).
KILL_POINTS = {
    "begin": ("current_manifest", 1),          # before anything is written
    "shard-0": ("write_shard", 1),             # before the first shard
    "shard-0-mid": ("record_batch", 3),        # inside the first shard: its first row group written
    "shard-1": ("write_shard", 2),
    "test-shard-0": ("write_shard", 3),        # the second split
    "shard-3-mid": ("record_batch", 13),         # inside the last shard (calls 12-14)
    "publish": ("current_manifest", 2),        # every shard written, the commit's read of the current manifest
    "manifest-write": ("manifest_write", 1),   # the manifest's one write (before os.replace / the PUT / the write)
    "clean": ("current_manifest", 3),          # the manifest written, before the clean-up
    "clean-mid": ("delete", 1),                # during the clean-up's first deletion
}


def arrays(value: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The dataset of ``value``: every pixel ``value``, labels 0..9 repeating."""
    return {split: (np.full((rows, 28, 28), value, np.uint8), (np.arange(rows) % 10).astype(np.uint8))
            for split, rows in (("train", TRAIN_ROWS), ("test", TEST_ROWS))}


def _pause_at(point: str, out: str) -> None:
    """Patch the function of ``point`` so that its n-th call prints ``PAUSED`` and waits for the SIGKILL."""
    name, nth = KILL_POINTS[point]
    calls = [0]

    def pausing(real):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == nth:
                print(f"PAUSED {point} {os.getpid()}", flush=True)
                time.sleep(600)
            return real(*args, **kwargs)
        return wrapper

    if name == "current_manifest":
        commit.current_manifest = pausing(commit.current_manifest)
    elif name == "write_shard":
        parquet.write_shard = pausing(parquet.write_shard)
    elif name == "record_batch":
        parquet.record_batch = pausing(parquet.record_batch)
    elif name == "delete":
        commit.fs.delete = pausing(fs.delete)
    elif name == "manifest_write":  # the step that makes the manifest visible, on each kind of store
        os.replace = pausing(os.replace)
        fs._write_in_place = pausing(fs._write_in_place)
        if not normalize_uri(out).is_local:
            fs.write_whole = pausing(fs.write_whole)


def main(argv: list[str]) -> None:
    if argv == ["--serve"]:
        serve()
        return
    value = int(argv[1])
    if len(argv) > 2:
        _pause_at(argv[2], argv[0])
    manifest = commit.write_local_dataset(argv[0], get_dataset("mnist"), arrays(value), num_shards=SHARDS,
                                          rows_per_group=ROWS_PER_GROUP)
    print(f"DONE {manifest.generation}", flush=True)


def serve() -> None:
    """Run every argument line of stdin in a forked child, one at a time; ``EXIT <status>`` after each.  These
    writers never race (one at a time), so the clean-up's wait for a racing publisher is cut short, and a killed
    writer's manifest temporary file counts as stale at once."""
    commit.SETTLE_S, commit.STALE_TEMP_S = 0.05, 0.0
    for line in sys.stdin:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                main(line.split())
            except BaseException as e:  # noqa: BLE001 - reported to the test, which fails on it
                print(f"ERROR {type(e).__name__}: {e}".replace("\n", " "), flush=True)
                code = 1
            finally:
                sys.stdout.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(f"EXIT {status}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
