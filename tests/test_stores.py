"""The commit on real store APIs: local disk, S3 (moto's standalone server through pyarrow's S3FileSystem), Azure
Blob (Azurite through pyarrow's AzureFileSystem) and two real FUSE mounts at ``/Volumes/<catalog>/<schema>/<volume>``
paths, one whose rename answers ENOSYS and one whose rename is a copy and a delete (:mod:`tests.stores.fuse_volume`).

On each store: a Spark ingest, a re-ingest and a loader that reads every row once; SIGKILL of a writer process
(:mod:`tests.stores.writer`) mid-commit, after which ``OUT`` holds the previous complete dataset and what the
killed writer left stays until its retention ends (or ``commit.clean`` with ``older_than``: ``spark-mnist gc``);
the last manifest write wins.  Marked ``full`` (one CI lane runs them): SIGKILL at ten points spread across the
write and the commit, and two racing writer processes, each with a reader polling ``OUT`` throughout that must
only ever see a complete dataset.  A store whose server or mount cannot be started
here skips, with the reason; ``tests/stores/setup.sh`` installs what they need (moto, mfusepy, fuse3, Azurite).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

import spark_mnist
from spark_mnist import fs
from spark_mnist.paths import normalize_uri
from spark_mnist.shards import commit, contract
from spark_mnist.shards.parquet import plan_row_groups, read_rows, total_rows
from tests.conftest import REPO
from tests.stores.servers import BUCKET, START_TIMEOUT_S
from tests.stores.writer import KILL_POINTS, TEST_ROWS, TRAIN_ROWS

# Every test here starts store servers, FUSE mounts or writer processes: slow (still part of make test), so that
# make test-fast stays a quick loop.
pytestmark = pytest.mark.slow
STORES = ["local", "s3", "azure", "volume-enosys", "volume-copy"]
POLL_PAUSE_S = 0.02  # between the polling reader's reads: it shares two cores with the writers


@pytest.fixture(scope="session")
def volumes(tmp_path_factory):
    """Two real FUSE mounts at ``/Volumes/spark_mnist_tests/stores/<mode>_<pid>``, one per rename mode; yields
    ``{mode: mountpoint}``.  Needs root, /dev/fuse, fusermount3 and mfusepy (tests/stores/setup.sh)."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("a FUSE mount needs root, /dev/fuse and fusermount3 (apt-get install fuse3)")
    try:
        import mfusepy  # noqa: F401 - its import finds libfuse
    except (ImportError, OSError) as e:
        pytest.skip(f"mfusepy cannot be used here: {e}")
    made = [p for p in (Path("/Volumes"), Path("/Volumes/spark_mnist_tests"),
                        Path("/Volumes/spark_mnist_tests/stores")) if not p.exists()]
    mounts, processes = {}, []
    try:
        for mode in ("enosys", "copy"):
            backing = tmp_path_factory.mktemp(f"volume-{mode}")
            mountpoint = Path(f"/Volumes/spark_mnist_tests/stores/{mode}_{os.getpid()}")
            mountpoint.mkdir(parents=True)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
            processes.append(subprocess.Popen([sys.executable, "-m", "tests.stores.fuse_volume", str(backing),
                                               str(mountpoint), mode], env=env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
            mounts[mode] = mountpoint
            deadline = time.monotonic() + START_TIMEOUT_S
            while not os.path.ismount(mountpoint):
                if processes[-1].poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"the FUSE mount at {mountpoint} did not come up")
                time.sleep(0.05)
        yield mounts
    finally:
        for mountpoint in mounts.values():
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
        for mountpoint in mounts.values():
            with contextlib.suppress(OSError):
                mountpoint.rmdir()
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir()


@pytest.fixture(params=STORES)
def out(request, tmp_path) -> str:
    """A fresh ``OUT`` on each store."""
    name = f"out-{uuid.uuid4().hex[:8]}"
    if request.param == "local":
        return str(tmp_path / name)
    if request.param == "s3":
        return request.getfixturevalue("s3_root")(name)
    if request.param == "azure":
        return request.getfixturevalue("azure_root")(name)
    mountpoint = request.getfixturevalue("volumes")[request.param.split("-")[1]]
    return str(mountpoint / name)


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


# How often Writers.start runs again a writer that died natively before its first line.
NATIVE_RETRIES = 2


class Writers:
    """Writer children forked from one process whose imports are done (``python -m tests.stores.writer --serve``):
    :meth:`write` commits a dataset, or is SIGKILLed at a kill point; :meth:`start` and :meth:`finish` let a test
    act while one holds."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-m", "tests.stores.writer", "--serve"], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env())

    def start(self, out: str, value: int, point: str | None = None) -> str:
        """Start committing the dataset of ``value`` to ``out`` (``point``: a kill point, or ``hold:<point>``);
        returns the writer's first line (``DONE <generation>``, ``PAUSED …``, ``HELD <point> <pid>``,
        ``ERROR …``).

        A writer that dies before its first line, with no Python error (a native abort: pyarrow's Azure client has
        ended the process with an uncaught ``Azure::Core::Http::TransportException`` when Azurite, loaded, closed a
        connection mid-response, apache/arrow GH-44286), is started again, at most :data:`NATIVE_RETRIES` times: to
        the store that is one more killed ingest, which the protocol must survive anyway."""
        command = " ".join([out, str(value)] + ([point] if point else [])) + "\n"
        for _ in range(1 + NATIVE_RETRIES):
            self.process.stdin.write(command)
            self.process.stdin.flush()
            line = self.process.stdout.readline().strip()
            if not line.startswith("EXIT"):
                return line
            print(f"writer {command.strip()!r} died with no line ({line}): started again", file=sys.stderr)
        raise AssertionError(f"writer {command.strip()!r} died with no line {1 + NATIVE_RETRIES} times ({line})")

    def finish(self) -> str:
        """The next line of the writer started (after a ``HELD``: its ``DONE`` or ``ERROR``), then its exit."""
        line = self.process.stdout.readline().strip()
        if line.startswith("EXIT"):
            return line
        status = self.process.stdout.readline().strip()
        assert status.startswith("EXIT"), (line, status)
        return line

    def write(self, out: str, value: int, kill_at: str | None = None) -> str:
        """Commit the dataset of ``value`` to ``out``; with ``kill_at``, SIGKILL the writer at that point.
        Returns the writer's line (``DONE <generation>`` or ``PAUSED <point> <pid>``)."""
        line = self.start(out, value, kill_at)
        if kill_at is not None and line.startswith(f"PAUSED {kill_at} "):
            os.kill(int(line.split()[-1]), signal.SIGKILL)
        status = self.process.stdout.readline().strip()
        expected = f"PAUSED {kill_at}" if kill_at else "DONE"
        assert line.startswith(expected + " ") and status.startswith("EXIT"), (line, status)
        return line

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


@contextlib.contextmanager
def writer_pools(count: int):
    """``count`` :class:`Writers`, closed (or killed) on the way out."""
    pools = [Writers() for _ in range(count)]
    try:
        yield pools
    finally:
        for pool in pools:
            if pool.process.poll() is None:
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    pool.close()
            if pool.process.poll() is None:
                pool.process.kill()


@pytest.fixture
def writers():
    with writer_pools(1) as (pool,):
        yield pool.write


def dataset_value(out: str, dataset: "contract.Dataset | None" = None) -> int:
    """Open ``out`` (or take the opened ``dataset``), read every row of both splits and return the one pixel value
    they all hold; fails on anything but one complete dataset."""
    dataset = dataset or spark_mnist.open_dataset(out)
    values = set()
    for split, rows in (("train", TRAIN_ROWS), ("test", TEST_ROWS)):
        plan = plan_row_groups(dataset.files(split))
        assert total_rows(plan) == rows == dataset.rows(split)
        index, images, labels = read_rows(plan, 0, rows, 28 * 28)
        assert np.array_equal(index, np.arange(rows)) and np.array_equal(labels, np.arange(rows) % 10)
        values.update(np.unique(images).tolist())
    assert len(values) == 1, f"{out}: a mix of datasets {sorted(values)}"
    return values.pop()


class Poller:
    """A reader polling ``OUT`` throughout, in a thread: every dataset it opens must read back complete, as one of
    the datasets written; ``seen`` counts the values read.  A read may fail only where its generation is no longer
    kept (replaced twice while it read: retention keeps the current and the previous generation); then it reopens."""

    def __init__(self, out: str):
        self.out, self.seen, self.errors, self.vanished = out, {}, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                dataset = spark_mnist.open_dataset(self.out)
            except Exception as e:  # noqa: BLE001 - OUT never holds less than one complete dataset
                self.errors.append(f"open: {e!r}")
                continue
            try:
                value = dataset_value(self.out, dataset)
                self.seen[value] = self.seen.get(value, 0) + 1
            except Exception as e:  # noqa: BLE001 - allowed only where retention removed what it read
                now = spark_mnist.open_dataset(self.out).manifest
                if dataset.manifest.generation in (now.generation, now.previous):
                    self.errors.append(f"read: {e!r}")
                else:
                    self.vanished += 1
            self._stop.wait(POLL_PAUSE_S)

    def __enter__(self) -> "Poller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self.errors, self.errors[:3]
        assert self.seen, "the reader never read a dataset"


def generations(out: str) -> list[str]:
    return [name for name in fs.list_names(normalize_uri(out)) if commit.generation_start(name)]


def gc(out: str) -> set[str]:
    """``spark-mnist gc OUT --older-than 0``: what killed or racing writers left goes; the generations left."""
    commit.clean(normalize_uri(out), older_than=0)
    return set(generations(out))


def past_retention(out: str) -> str:
    """A generation no manifest names, started twice the retention ago (a killed ingest's, a day old)."""
    start = datetime.now(timezone.utc) - timedelta(seconds=2 * commit.RETENTION_S)
    name = f"{start.strftime(commit.GENERATION_TIME)}_0123456789ab"
    location = normalize_uri(out).join(name, "train")
    if location.os_path is not None:
        os.makedirs(location.os_path, exist_ok=True)
    fs.write_whole(location.join("part-00000.parquet"), b"shard")
    return name


@pytest.mark.slow
@pytest.mark.connect
def test_ingest_replace_and_read_every_row_once(spark, small_source, out):
    """A Spark ingest and a re-ingest on the store; open_dataset, the loader, load_data and Spark read it back."""
    from spark_mnist.driver.ingest import ingest
    from spark_mnist.rank.loader import ShardLoader

    source, arrays = small_source
    first = ingest(spark, str(source), out, num_shards=2, row_group_bytes=64 * 784)
    second = ingest(spark, str(source), out, num_shards=3, row_group_bytes=64 * 784)
    assert second.previous == first.generation
    assert sorted(fs.list_names(normalize_uri(out))) == sorted([first.generation, second.generation,
                                                               contract.MANIFEST_NAME])
    dataset = spark_mnist.open_dataset(out)
    assert dataset.manifest.generation == second.generation and len(dataset.files("train")) == 3
    with ShardLoader(dataset.files("train"), rank=0, world_size=1, batch_size=64, shuffle=False,
                     drop_remainder=False) as loader:
        index = np.concatenate([batch[0].numpy() for batch in loader.iter_with_index()])
    assert np.array_equal(np.sort(index), np.arange(len(arrays["train"][1])))  # every row once
    (x_train, y_train), (x_test, y_test) = spark_mnist.load_data(out)
    assert np.array_equal(x_train, arrays["train"][0]) and np.array_equal(y_test, arrays["test"][1])
    if out.startswith("/"):  # Spark reads the manifest's files where its file systems reach (local, FUSE)
        assert spark.read.parquet(*dataset.files("test")).count() == len(arrays["test"][1])


@pytest.mark.connect
def test_a_kill_at_the_manifest_write_leaves_the_previous_dataset(out, writers):
    """SIGKILL just before the manifest's write: OUT holds the previous dataset; the killed one's generation stays
    through the next commit (younger than the retention), and gc removes it."""
    writers(out, 1)
    writers(out, 2, kill_at="manifest-write")
    assert dataset_value(out) == 1
    (killed,) = set(generations(out)) - {spark_mnist.open_dataset(out).manifest.generation}
    done = writers(out, 3).split()[1]
    assert dataset_value(out) == 3 and killed in generations(out)
    assert gc(out) == {done, spark_mnist.open_dataset(out).manifest.previous}


@pytest.mark.full
def test_sigkill_at_every_point_of_the_write_and_commit(out, writers):
    """Ten kill points, each with a reader polling OUT throughout: the reader only ever sees the previous complete
    dataset or the new one, never a mix and never nothing; the next commit succeeds, and gc leaves only it and its
    previous."""
    writers(out, 1)
    current = 1
    with Poller(out) as poller:
        for value, point in enumerate(KILL_POINTS, start=2):
            if point == "clean-mid":  # something past the retention for the clean-up to delete
                past_retention(out)
            writers(out, value, kill_at=point)
            landed = dataset_value(out)
            assert landed in (current, value), (point, landed)
            # the manifest's write is the commit point: a kill before it keeps the previous dataset
            assert landed == (value if point in ("clean", "clean-mid") else current), point
            current = landed
        done = writers(out, 99)
    assert dataset_value(out) == 99 and set(poller.seen) <= {1, 99, *range(2, 2 + len(KILL_POINTS))}
    kept = {done.split()[1], spark_mnist.open_dataset(out).manifest.previous}
    assert kept < set(generations(out)) and gc(out) == kept  # what the killed writers left, until gc
    assert sorted(fs.list_names(normalize_uri(out))) == sorted(kept | {contract.MANIFEST_NAME})


@pytest.mark.full
def test_racing_writers_leave_one_complete_dataset(out, writers):
    """Two writer processes racing into one OUT, a reader polling it: one complete dataset at every moment; the
    loser's generation stays until gc."""
    writers(out, 1)
    with Poller(out) as poller:
        command = [[sys.executable, "-m", "tests.stores.writer", out, str(v)] for v in (2, 3)]
        for _ in range(1 + NATIVE_RETRIES):  # a race in which a writer aborted natively is run again (Writers.start)
            children = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env=_child_env()) for c in command]
            ended = []
            for child in children:
                _, stderr = child.communicate(timeout=120)
                ended.append((child.returncode, stderr))
            if not any(code == -signal.SIGABRT and "terminate called" in stderr for code, stderr in ended):
                break
        for code, stderr in ended:
            assert code == 0, stderr[-3000:]
        assert dataset_value(out) in (2, 3)
    assert set(poller.seen) <= {1, 2, 3}
    done = writers(out, 4)
    assert gc(out) == {done.split()[1], spark_mnist.open_dataset(out).manifest.previous}


def test_the_last_manifest_write_wins(out):
    """Writer A (the older generation) holds with every shard written while writer B (a newer generation)
    publishes: B's clean-up leaves A's generation (younger than the retention).  Released, A publishes over B (the
    last manifest write wins, B's generation kept as its previous); gc then leaves just those two."""
    with writer_pools(2) as (a, b):
        first = a.write(out, 1).split()[1]
        held = a.start(out, 2, "hold:publish")
        assert held.startswith("HELD publish "), held
        second = b.write(out, 3).split()[1]
        assert dataset_value(out) == 3
        (loser,) = set(generations(out)) - {first, second}  # A's, kept
        os.kill(int(held.split()[-1]), signal.SIGUSR1)
        assert a.finish() == f"DONE {loser}"
    manifest = spark_mnist.open_dataset(out).manifest
    assert dataset_value(out) == 2 and (manifest.generation, manifest.previous) == (loser, second)
    assert gc(out) == {loser, second}


@pytest.mark.full
def test_an_s3_endpoint_from_the_settings_reaches_the_driver_and_the_tasks(s3_root, small_source, tmp_path):
    """``--s3-endpoint-url`` (the ``storage.s3_endpoint_url`` setting) instead of the URI's query, credentials from
    the standard variables: ``spark-mnist ingest`` into a plain ``s3://`` OUT (the driver's commit and the Spark
    tasks' shards reach moto), then the dataset read back with ``AWS_ENDPOINT_URL``, the standard variable."""
    from urllib.parse import parse_qsl, urlsplit

    from spark_mnist.envs import scoped_env

    source, arrays = small_source
    endpoint = "http://" + dict(parse_qsl(urlsplit(s3_root("settings")).query))["endpoint_override"]
    out = f"s3://{BUCKET}/settings/mnist"
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"}
    env = {k: v for k, v in _child_env().items() if not k.startswith("AWS_ENDPOINT_URL")}
    result = subprocess.run([sys.executable, "-m", "spark_mnist.cli", "ingest", "--source", str(source), "--output",
                             out, "--num-shards", "2", "--s3-endpoint-url", endpoint],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**env, **credentials})
    assert result.returncode == 0, result.stderr[-3000:]
    with scoped_env({**credentials, "AWS_ENDPOINT_URL": endpoint}):
        (x, y), _ = spark_mnist.load_data(out, "fashion-mnist")
    np.testing.assert_array_equal(y, arrays["train"][1])
    assert x.shape == arrays["train"][0].shape
