"""A pytest plugin for testing your own pipelines on spark-mnist's sources, datasets and loaders, in the test
process and the local ranks it starts.  The guide: docs/how-to/testing.md.

Installed with the wheel, and loaded only where a test suite opts in (no ``pytest11`` entry point: its fixtures,
``spark`` among them, never reach a suite that did not ask).  Loading it costs nothing: it imports neither Spark nor
torch, and starts nothing until a test asks for a fixture.  Opt in with one line in your root ``conftest.py``::

    pytest_plugins = ["spark_mnist.testing"]

(or ``pytest -p spark_mnist.testing``, which also works where ``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1`` is set).

What it gives:

* ``spark``: one local SparkSession for the whole run (session-scoped), quiet, configured as spark-mnist's own local
  sessions are (:func:`spark_mnist.driver.session.spark_session`), stopped at the end.  Classic ``local[2]`` by
  default; Spark Connect with ``--spark-remote local[2]`` (a local server started in this process) or
  ``--spark-remote sc://host:port``, or where ``SPARK_REMOTE`` is set.  ``--spark-master`` picks the classic master.
* ``idx_source``: a factory of small, valid gz IDX sources for any registry dataset and row count, and of named
  defective copies (:data:`DEFECTS`) for testing error paths.  Also callable without pytest: :func:`write_idx_source`.
* ``ingested_dataset``: a factory of ingested datasets, written by ingest's own shard writer with no JVM, for
  rank-side tests.  Also callable without pytest: :func:`write_ingested_dataset`.
* :func:`run_ranks`: run a function as N local ranks (torch.distributed with gloo on CPU), each in its own process
  with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set as
  torchrun sets them; the caller's environment is never changed.  The ranks are forked from multiprocessing's
  fork server, which imports torch once for the whole test run (:data:`RANK_PRELOAD`) rather than once per rank.
"""

import multiprocessing
import os
import queue
import socket
import tempfile
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pytest

from spark_mnist.config import SparkSettings
from spark_mnist.datasets import SPLITS, get_dataset
from spark_mnist.driver.session import REMOTE_ENV, local_server_url, spark_session
from spark_mnist.errors import check_choice
from spark_mnist.formats.idx import write_idx
from spark_mnist.shards.arrays import load_data, write_local_dataset

__all__ = ["DEFECTS", "make_arrays", "IdxSource", "write_idx_source", "write_ingested_dataset",
           "RankFailedError", "free_port", "run_ranks", "spark_remote", "spark", "spark_remote_args",
           "idx_source", "ingested_dataset"]  # fmt: skip

# The defects :func:`write_idx_source` can plant, each in one file of one split, and what it does to that file.
DEFECTS = {
    "truncated": "the images file cut to half its gzip bytes (an interrupted download)",
    "html": "the images file replaced by an HTML page saved under its .gz name (a proxy's or firewall's answer)",
    "wrong-magic": "the images file's magic number says labels (dtype uint8, 1 dimension)",
    "labels-out-of-range": "one label equal to the dataset's number of classes",
    "count-mismatch": "one label fewer than there are images",
}
HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Access denied</title></head><body>Blocked by a proxy</body></html>\n"


# --- sources ---------------------------------------------------------------------------------------------------------


def make_arrays(
    rows: int, seed: int = 0, num_classes: int = 10, shape: Sequence[int] = (28, 28)
) -> tuple[np.ndarray, np.ndarray]:
    """Random images and labels that cover every class when ``rows`` allows.

    Returns:
        ``images`` uint8 of shape ``(rows, *shape)`` and ``labels`` uint8 of shape (rows,), values in
        ``[0, num_classes)``, shuffled with ``seed``.
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(rows, *shape), dtype=np.uint8)
    return images, rng.permutation(np.arange(rows) % num_classes).astype(np.uint8)


@dataclass(frozen=True)
class IdxSource:
    """A directory of the four gz IDX files of a dataset, as :func:`write_idx_source` wrote them.

    ``arrays[split]`` is ``(images, labels)`` as written (before any defect): images uint8 (n, H, W) in the file's
    own orientation, labels uint8 (n,).  ``defect`` names the planted defect (:data:`DEFECTS`) or is ``None``.
    """

    path: Path
    dataset: str
    arrays: dict[str, tuple[np.ndarray, np.ndarray]]
    defect: Optional[str] = None
    defect_file: Optional[Path] = None

    def file(self, split: str, kind: str) -> Path:
        """The path of ``split``'s (``train``/``test``) ``kind`` (``images``/``labels``) file."""
        return self.path / get_dataset(self.dataset).file(split, kind).name


def write_idx_source(
    directory: str | os.PathLike,
    dataset: str = "mnist",
    train_rows: int = 600,
    test_rows: int = 100,
    seed: int = 0,
    defect: Optional[str] = None,
    defect_split: str = "train",
) -> IdxSource:
    """Write a small synthetic source of registry dataset ``dataset`` into ``directory``: its four gz IDX files,
    named as the registry names them, with random images of the dataset's shape and labels covering its classes.

    Args:
        directory: created when missing.
        dataset: a registry name (:func:`spark_mnist.datasets.get_dataset`).
        train_rows, test_rows: rows per split.
        seed: the train split's seed (the test split uses ``seed + 1``).
        defect: ``None`` for a valid source, or a name in :data:`DEFECTS`, planted in ``defect_split``.
        defect_split: ``train`` or ``test``.
    Returns:
        The :class:`IdxSource`.
    Raises:
        ValueError: an unknown dataset, defect or split, or a row count below 1.
    """
    check_choice("defect", defect, [None, *DEFECTS])
    check_choice("defect_split", defect_split, SPLITS)
    spec, arrays = get_dataset(dataset), {}
    for split, rows, split_seed in (("train", train_rows, seed), ("test", test_rows, seed + 1)):
        if rows < 1:
            raise ValueError(f"Invalid {split}_rows: {rows!r}. Must be at least 1.")
        arrays[split] = make_arrays(rows, split_seed, spec.num_classes, spec.image_shape)
    source = IdxSource(Path(directory), spec.name, arrays)
    source.path.mkdir(parents=True, exist_ok=True)
    # The files in all_files' order: train images, train labels, test images, test labels.
    for entry, array in zip(spec.all_files(), [*arrays["train"], *arrays["test"]]):
        write_idx(source.path / entry.name, array)
    if defect is None:
        return source
    # Plant the defect: overwrite one file of ``defect_split``.
    images, labels = arrays[defect_split]
    target = source.file(defect_split, "labels" if defect in ("labels-out-of-range", "count-mismatch") else "images")
    if defect in ("truncated", "html"):
        target.write_bytes(HTML_PAGE if defect == "html" else target.read_bytes()[: target.stat().st_size // 2])
    else:  # valid IDX that does not fit the split
        out_of_range = np.concatenate([[spec.num_classes], labels[1:]]).astype(np.uint8)
        bad = {"wrong-magic": images.reshape(-1), "labels-out-of-range": out_of_range, "count-mismatch": labels[:-1]}
        write_idx(target, bad[defect])
    return replace(source, defect=defect, defect_file=target)


# --- ingested datasets ------------------------------------------------------------------------------------------------


def write_ingested_dataset(
    output: str | os.PathLike,
    dataset: str = "mnist",
    train_rows: int = 600,
    test_rows: int = 100,
    num_shards: int = 2,
    seed: int = 0,
    rows_per_group: Optional[int] = None,
) -> Path:
    """Write a complete ingested dataset at ``output`` (a local path or a URI) with no Spark session: the shards by
    ingest's own shard writer under a new generation, then the manifest, by the same commit as ``spark-mnist ingest``
    (:func:`spark_mnist.shards.arrays.write_local_dataset`).

    Rows are those of :func:`write_idx_source`'s files with the same arguments (:func:`make_arrays` ``(rows, seed)``
    for train, ``(rows, seed + 1)`` for test), read back by :func:`spark_mnist.load_data`, which turns them upright
    as ingest does (:func:`spark_mnist.datasets.upright`): what ingesting those files gives.

    Returns:
        ``output`` as a Path.
    Raises:
        ValueError: an unknown dataset, or a row count below 1.
    """
    with tempfile.TemporaryDirectory() as scratch:
        train, test = load_data(write_idx_source(scratch, dataset, train_rows, test_rows, seed).path, dataset)
    arrays = {"train": train, "test": test}
    write_local_dataset(output, get_dataset(dataset), arrays, num_shards=num_shards, rows_per_group=rows_per_group)
    return Path(output)


# --- ranks ------------------------------------------------------------------------------------------------------------


class RankFailedError(RuntimeError):
    """A rank started by :func:`run_ranks` raised: the message names the rank and carries its traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    # A plain bind, as before: socket.create_server sets SO_REUSEADDR, and the one CI run that used it here met
    # EADDRINUSE at run_ranks' rendezvous.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What the fork server :func:`run_ranks` starts its ranks from imports once, before any rank (multiprocessing's
# ``set_forkserver_preload``): torch's import is most of a rank's start.
RANK_PRELOAD = ["torch.distributed", "spark_mnist.testing"]


def _run_rank(fn: Callable[..., Any], args: tuple, backend: str, results: Any, environ: dict, rank: int) -> None:
    """The body of rank ``rank``'s process (forked from the fork server): the environment ``environ`` (the caller's
    at the call, as the server's is its own start's, with torchrun's variables on top) and the rank's ``RANK`` and
    ``LOCAL_RANK``; join the group, run ``fn``."""
    os.environ.clear()
    os.environ.update(environ, RANK=str(rank), LOCAL_RANK=str(rank))
    import torch.distributed as dist  # the torch extra: the kit's Spark and dataset fixtures work without it

    try:
        dist.init_process_group(backend)  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
        # All ranks join before fn runs: an fn that returns at once would tear the group down (how-to/testing).
        dist.barrier()
        try:
            results.put((rank, True, fn(*args)))
        finally:
            dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - every failure, KeyboardInterrupt too, goes to the parent (RankFailedError)
        results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_ranks(
    fn: Callable[..., Any], world_size: int = 2, *args: Any, backend: str = "gloo", timeout: float = 300.0
) -> list[Any]:
    """Run ``fn(*args)`` as ``world_size`` local ranks of one torch.distributed group and return their results.

    Each rank is a process of its own, forked from multiprocessing's fork server (``forkserver``: started once per
    calling process, having imported :data:`RANK_PRELOAD`; ``sys.path``, the working directory and the main module
    are the caller's, as with ``spawn``), with the caller's environment of the moment and the variables torchrun
    gives (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), in
    which the default process group is initialised (``gloo``: CPU) before ``fn`` runs and destroyed after.  The
    caller's environment is left as it was.  ``fn``, ``args`` and the results must be picklable (``fn`` a
    module-level function).  Source: Python's ``multiprocessing`` ("Contexts and start methods").

    Returns:
        ``[result of rank 0, result of rank 1, ...]``.
    Raises:
        ValueError: ``world_size`` below 1.
        RankFailedError: a rank raised (the first to report, with its traceback), or died, or ``timeout`` seconds
            passed.
    """
    if world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size!r}. Must be at least 1.")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(RANK_PRELOAD)  # read when the server starts: this process's first call
    results = context.Queue()
    world = {"WORLD_SIZE": world_size, "LOCAL_WORLD_SIZE": world_size, "GROUP_RANK": 0, "MASTER_PORT": free_port()}
    environ = {**os.environ, **{k: str(v) for k, v in world.items()}, "MASTER_ADDR": "127.0.0.1"}
    processes = []
    for r in range(world_size):
        processes.append(context.Process(target=_run_rank, args=(fn, args, backend, results, environ, r), daemon=True))
        processes[-1].start()
    outcomes: dict[int, Any] = {}
    try:
        while len(outcomes) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                dead = [r for r, p in enumerate(processes) if r not in outcomes and p.exitcode not in (None, 0)]
                raise RankFailedError(
                    f"rank(s) {dead or 'unknown'} gave no result in {timeout:.0f} s "
                    f"(exit codes {[p.exitcode for p in processes]})"
                ) from None
            if not ok:
                raise RankFailedError(f"rank {rank} of {world_size} failed: {value}")
            outcomes[rank] = value
    finally:
        for p in processes:
            p.join(timeout=10 if len(outcomes) == world_size else 1)
            if p.is_alive():
                p.kill()
                p.join()
    return [outcomes[r] for r in range(world_size)]


# --- the pytest plugin -----------------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("spark-mnist", "spark-mnist test kit (spark_mnist.testing)")
    remote = (
        "run the `spark` fixture over Spark Connect: local[N] starts a local server in this process, "
        "sc://host:port uses a running one (default: the SPARK_REMOTE variable; else classic)"
    )
    group.addoption("--spark-remote", metavar="URL", help=remote)
    master = "the classic session's master (default %(default)s)"
    group.addoption("--spark-master", default="local[2]", metavar="MASTER", help=master)


def spark_remote(config: pytest.Config) -> Optional[str]:
    """The Spark Connect URL the ``spark`` fixture uses: ``--spark-remote``, else ``SPARK_REMOTE``, else ``None``
    (classic)."""
    return config.getoption("--spark-remote", None) or os.environ.get(REMOTE_ENV) or None


@pytest.fixture(scope="session")
def spark(pytestconfig: pytest.Config) -> Iterator[Any]:
    """One local SparkSession for the whole test run, quiet (WARN), stopped (and its environment restored) at the
    end: classic on ``--spark-master`` (``local[2]``), or Spark Connect where ``--spark-remote``/``SPARK_REMOTE``
    names a server.  Configured as spark-mnist's own local sessions are, with 2 GiB of driver memory."""
    remote, master = spark_remote(pytestconfig), pytestconfig.getoption("--spark-master")
    conf = {"spark.driver.memory": "2g"}
    with spark_session(SparkSettings(master=master, remote=remote, app_name="spark-mnist-tests", conf=conf)) as session:
        yield session


@pytest.fixture
def spark_remote_args(request: pytest.FixtureRequest, spark: Any) -> list[str]:
    """``spark-mnist`` command-line options that make a child command use this run's kind of session: none for
    classic; over Spark Connect, ``--remote sc://...`` naming the server (for a local server, the one the ``spark``
    fixture started, on the port its client reached: 15002, or with ``SPARK_TESTING`` set the ephemeral port
    pyspark then binds, so that test runs side by side each have their own server).  It asks for ``spark`` as a
    fixture, so the session (and the variables pyspark sets for it) starts before the test does."""
    remote = spark_remote(request.config)
    return [] if remote is None else ["--remote", remote if remote.startswith("sc://") else local_server_url()]


@pytest.fixture
def idx_source(tmp_path: Path) -> Callable[..., IdxSource]:
    """A factory: ``idx_source(dataset="mnist", train_rows=600, test_rows=100, seed=0, defect=None,
    defect_split="train")`` writes a new source directory under ``tmp_path`` (:func:`write_idx_source`) and returns
    its :class:`IdxSource`."""

    def make(dataset: str = "mnist", **kwargs: Any) -> IdxSource:  # each source in a fresh subdirectory
        return write_idx_source(tempfile.mkdtemp(prefix=f"source-{dataset}-", dir=tmp_path), dataset, **kwargs)

    return make


@pytest.fixture
def ingested_dataset(tmp_path: Path) -> Callable[..., Path]:
    """A factory: ``ingested_dataset(dataset="mnist", train_rows=600, test_rows=100, num_shards=2, seed=0)`` writes
    a complete ingested dataset under ``tmp_path`` with no Spark session (:func:`write_ingested_dataset`) and returns
    its directory, ready for :func:`spark_mnist.open_dataset` and the loader."""

    def make(dataset: str = "mnist", **kwargs: Any) -> Path:  # each dataset in a fresh subdirectory
        return write_ingested_dataset(tempfile.mkdtemp(prefix=f"dataset-{dataset}-", dir=tmp_path), dataset, **kwargs)

    return make
