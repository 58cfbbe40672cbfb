"""One ingest's write and commit without Spark, in its own process, for the store tests: a dataset whose every pixel
is ``VALUE`` committed to ``OUT`` through the same functions ingest uses (:func:`spark_mnist.shards.arrays.
write_local_dataset`: shards under a new generation by their final names, then the manifest, then the clean-up).

``python -m tests.stores.writer OUT VALUE [POINT]``: with a kill point (:data:`KILL_POINTS`) the process prints
``PAUSED <point> <pid>`` when it gets there and waits to be SIGKILLed;
with ``hold:<point>`` it prints ``HELD <point> <pid>`` there and waits for SIGUSR1, then goes on; it ends with
``DONE <generation>``.  ``python -m tests.stores.writer --serve`` reads such argument lines from stdin and runs
each in a process forked from itself, its imports done once (:class:`Writers` in the tests), so a kill costs no
interpreter start.  The retention is the production one: what a killed writer leaves stays until ``commit.clean``
with ``older_than`` (``spark-mnist gc``).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

from spark_mnist import fs
from spark_mnist.datasets import get_dataset
from spark_mnist.paths import normalize_uri
from spark_mnist.shards import arrays as shard_arrays
from spark_mnist.shards import commit, parquet
from spark_mnist.shards.arrays import write_local_dataset
from spark_mnist.shards.contract import MANIFEST_NAME

TRAIN_ROWS, TEST_ROWS, SHARDS, ROWS_PER_GROUP = 40, 20, 2, 8
# Where a kill lands, spread across the write and the commit: (point, function patched, which call pauses).
KILL_POINTS = {
    "begin": ("current_manifest", 1),          # before anything is written
    "shard-0": ("write_shard", 1),             # before the first shard
    "shard-0-mid": ("record_batch", 3),        # inside the first shard: its first row group written
    "shard-1": ("write_shard", 2),
    "test-shard-0": ("write_shard", 3),        # the second split
    "shard-3-mid": ("record_batch", 13),       # inside the last shard (calls 12-14)
    "publish": ("current_manifest", 2),        # every shard written, the commit's read of the current manifest
    "manifest-write": ("manifest_write", 1),   # the manifest's one write (before os.replace / the PUT / the write)
    "clean": ("current_manifest", 3),          # the manifest written, before the clean-up
    "clean-mid": ("delete", 1),                # during the clean-up's first deletion (of a generation past retention)
}


def arrays(value: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The dataset of ``value``: every pixel ``value``, labels 0..9 repeating."""
    return {split: (np.full((rows, 28, 28), value, np.uint8), (np.arange(rows) % 10).astype(np.uint8))
            for split, rows in (("train", TRAIN_ROWS), ("test", TEST_ROWS))}


def _names(name: str, target) -> bool:
    """Whether ``target`` (a path, or a Location) names the file ``name``."""
    return str(getattr(target, "uri", target)).split("?")[0].endswith("/" + name)


def _pause_at(point: str, out: str, hold: bool = False) -> None:
    """Patch the function of ``point`` so that its n-th call prints ``PAUSED`` and waits for the SIGKILL; with
    ``hold``, prints ``HELD`` and waits for SIGUSR1, then makes the call."""
    name, nth = KILL_POINTS[point]
    calls = [0]
    released = [False]
    if hold:
        signal.signal(signal.SIGUSR1, lambda *_: released.__setitem__(0, True))

    def pausing(real, counts=lambda *args: True):
        def wrapper(*args, **kwargs):
            if counts(*args):
                calls[0] += 1
                if calls[0] == nth:
                    print(f"{'HELD' if hold else 'PAUSED'} {point} {os.getpid()}", flush=True)
                    deadline = time.monotonic() + 600
                    while not released[0] and time.monotonic() < deadline:
                        time.sleep(0.01)
            return real(*args, **kwargs)
        return wrapper

    if name == "current_manifest":
        commit.current_manifest = pausing(commit.current_manifest)
    elif name == "write_shard":  # the name write_local_dataset calls
        shard_arrays.write_shard = pausing(parquet.write_shard)
    elif name == "record_batch":
        parquet.record_batch = pausing(parquet.record_batch)
    elif name == "delete":
        commit.fs.delete = pausing(fs.delete)
    elif name == "manifest_write":  # the step that makes the manifest visible, on each kind of store
        manifest = lambda target, *_: _names(MANIFEST_NAME, target)  # noqa: E731
        os.replace = pausing(os.replace, lambda src, dst, *_: manifest(dst))
        fs._write_in_place = pausing(fs._write_in_place, manifest)
        if normalize_uri(out).os_path is None:
            fs.write_whole = pausing(fs.write_whole, manifest)


def main(argv: list[str]) -> None:
    serve() if argv[:1] == ["--serve"] else run(argv)


def run(argv: list[str]) -> None:
    """One writer: ``OUT VALUE [POINT | hold:POINT]``."""
    value = int(argv[1])
    if len(argv) > 2:
        point = argv[2].removeprefix("hold:")
        _pause_at(point, argv[0], hold=point != argv[2])
    manifest = write_local_dataset(argv[0], get_dataset("mnist"), arrays(value), num_shards=SHARDS,
                                          rows_per_group=ROWS_PER_GROUP)
    print(f"DONE {manifest.generation}", flush=True)


def serve() -> None:
    """Run every argument line of stdin in a forked child, one at a time; ``EXIT <status>`` after each."""
    for line in sys.stdin:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run(line.split())
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
