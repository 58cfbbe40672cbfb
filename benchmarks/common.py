"""Shared helpers of the benchmarks: timing epochs and consuming batches the same way for every loader, our loader's
row, peak RSS, a timed ingest with its stages, the Spark session, the aligned table and the final JSON line.

Nothing here is part of the ``spark_mnist`` package; run the scripts from the repository root with
``python -m benchmarks.<name>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import resource
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
BATCH_SIZE = 256
IMAGE_SHAPE = (28, 28)

log = logging.getLogger("benchmarks")


# --------------------------------------------------------------------------------------------------- timing

@dataclass
class Epochs:
    """Per-epoch ``(samples, seconds)`` of one loader; epoch 0 is the cold one."""

    samples: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    setup_seconds: float = 0.0

    def summary(self, warm: bool = True) -> dict[str, Any]:
        """cold = epoch 0 (plus ``setup_seconds``, e.g. opening the files); warm = median of the later epochs, or
        None when only one epoch ran or ``warm`` is false (a streaming loader: every epoch reads the files);
        ``epoch_samples_per_s``: every epoch's own rate."""
        rates = [n / s if s > 0 else float("inf") for n, s in zip(self.samples, self.seconds)]
        return {
            "cold_samples_per_s": self.samples[0] / (self.seconds[0] + self.setup_seconds),
            "warm_samples_per_s": statistics.median(rates[1:]) if warm and len(rates) > 1 else None,
            "epoch_samples_per_s": rates,
            "samples_per_epoch": self.samples[0],
            "setup_seconds": round(self.setup_seconds, 4),
            "epoch_seconds": [round(s, 4) for s in self.seconds],
        }


def consume(images, labels) -> int:
    """Consume one batch the same way for every loader: check its type and shape, touch one pixel of every sample
    and the labels.  Returns the batch size."""
    import torch

    if images.dim() != 4 or tuple(images.shape[1:]) != (1, *IMAGE_SHAPE):
        raise AssertionError(f"images of shape {tuple(images.shape)}: expected (B, 1, {IMAGE_SHAPE[0]}, "
                             f"{IMAGE_SHAPE[1]})")
    if images.dtype not in (torch.uint8, torch.float32):
        raise AssertionError(f"images of dtype {images.dtype}: expected uint8 or float32")
    if labels.shape != (images.shape[0],):
        raise AssertionError(f"labels of shape {tuple(labels.shape)} for {images.shape[0]} images")
    consume.touched += float(images[:, 0, 14, 14].sum()) + int(labels[-1])  # type: ignore[attr-defined]
    return int(images.shape[0])


consume.touched = 0.0  # type: ignore[attr-defined]


def time_epochs(epochs: Iterable[Iterable], setup_seconds: float = 0.0) -> Epochs:
    """Run every epoch (an iterable of ``(images, labels)`` batches, consumed with :func:`consume`) and time it.
    Lazy iterables (generators) are timed from their first ``next``, so their start-up counts in the epoch."""
    result = Epochs(setup_seconds=setup_seconds)
    for batches in epochs:
        started = time.perf_counter()
        samples = 0
        for images, labels, *_ in batches:
            samples += consume(images, labels)
        result.seconds.append(time.perf_counter() - started)
        result.samples.append(samples)
    return result


@contextlib.contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """``with stopwatch() as t: ...`` then ``t["seconds"]``."""
    t = {"seconds": float("nan")}
    started = time.perf_counter()
    try:
        yield t
    finally:
        t["seconds"] = time.perf_counter() - started


def fmt_stages(stages: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in stages.items())


# --------------------------------------------------------------------------------------------------- processes

def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB: ``VmHWM`` where Linux has it, else ``ru_maxrss``.

    Not ``ru_maxrss`` on Linux: it survives ``exec``, so a ``spawn`` child reports at least its parent's RSS at
    the fork (e.g. a Spark driver's), not its own."""
    hwm = vm_hwm_mb()
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``, Linux >= 4.0) so that :func:`vm_hwm_mb` measures from now on.
    ``ru_maxrss`` is not reset.  Returns whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm_mb() -> float | None:
    """This process's peak RSS since start or the last :func:`reset_peak_rss`, in MiB (None off Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _call_and_measure(fn: Callable, args: tuple) -> tuple[Any, float, int]:
    import torch  # a training process has torch loaded before its loader starts: not a loader cost

    result = fn(*args)
    return result, peak_rss_mb(), torch.get_num_threads()


def run_in_child(fn: Callable, *args) -> dict[str, Any]:
    """Run ``fn(*args)`` (a module-level function returning a dict) in a fresh ``spawn`` process, so each loader
    starts from the same state and its peak RSS is its own.  Returns ``fn``'s dict plus ``peak_rss_mb`` and
    ``torch_threads``.  Exceptions raised in the child are re-raised here."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=quiet_logs) as pool:
        result, rss, threads = pool.submit(_call_and_measure, fn, args).result()
    return {**result, "peak_rss_mb": round(rss, 1), "torch_threads": threads}


def row_ours(paths: Sequence[str], epochs: int, memory_budget_bytes: int | None = None,
             device: str | None = None) -> dict[str, Any]:
    """Our :class:`~spark_mnist.rank.loader.ShardLoader` over ``paths`` (rank 0 of 1, batch 256, default settings but
    ``memory_budget_bytes`` and ``device``): ``epochs`` full epochs.  The first is cold (reads the Parquet files;
    the constructor's metadata reads count in it); the later ones are warm when the shard is held in memory (on the
    host, or on ``device``: batches gathered there), and streamed from the files again otherwise (no warm figure;
    see ``epoch_samples_per_s``).  Run it with :func:`run_in_child`."""
    from spark_mnist.rank.loader import DEFAULT_MEMORY_BUDGET_BYTES, ShardLoader

    budget = DEFAULT_MEMORY_BUDGET_BYTES if memory_budget_bytes is None else memory_budget_bytes
    with stopwatch() as setup:
        loader = ShardLoader(paths, rank=0, world_size=1, batch_size=BATCH_SIZE, memory_budget_bytes=budget,
                             device=device)
    with loader:
        def epoch(e):
            loader.set_epoch(e)
            return iter(loader)
        result = time_epochs((epoch(e) for e in range(epochs)), setup_seconds=setup["seconds"])
    return {**result.summary(warm=loader.in_memory or loader.resident), "in_memory": loader.in_memory,
            "resident": loader.resident, "device": device, "rows": loader.rows, "row_groups": len(loader.plan)}


# --------------------------------------------------------------------------------------------------- data

def parse_idx_files(source: str, names: Sequence[str] = IDX_FILES) -> dict[str, Any]:
    """``{name: array}`` for the gz IDX files ``names`` under ``source`` (decompressed and parsed, no Spark)."""
    from spark_mnist.formats.idx import parse_idx

    return {name: parse_idx(os.path.join(source, name)).array for name in names}


# --------------------------------------------------------------------------------------------------- Spark

@contextlib.contextmanager
def bench_spark(master: str = "local[2]", remote: str | None = None) -> Iterator["SparkSession"]:
    """A fresh local SparkSession as the CLI makes it (``spark_mnist.driver.session.spark_session``): classic on
    ``master``, or over Spark Connect with ``remote`` (``local[2]``: a local Connect server in this process)."""
    from spark_mnist.config import SparkSettings
    from spark_mnist.driver.session import spark_session

    with spark_session(SparkSettings(master=master, remote=remote, app_name="spark-mnist-bench")) as spark:
        yield spark


@contextlib.contextmanager
def ingest_stages(stages: dict[str, float]) -> Iterator[None]:
    """While the block runs, add to ``stages`` the seconds of what ingest calls: ``read_files`` (Spark's binaryFile
    job), ``open_idx_split`` (headers and labels), ``read_images`` (``IdxReader.read``: the streamed decompression),
    ``write_pieces`` (the write jobs) and ``commit``; exclusive, a call nested in another counts only in itself."""
    from unittest import mock

    from spark_mnist.driver import ingest as module
    from spark_mnist.formats.idx import IdxReader

    inner = [0.0]  # seconds of the calls nested in the open one, one entry per open call (and the block)

    def timed(name: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            inner.append(0.0)
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                stages[name] = stages.get(name, 0.0) + elapsed - inner.pop()
                inner[-1] += elapsed
        return call

    targets = [(module, "read_files"), (module, "open_idx_split"), (module, "write_pieces"),
               (module.commit, "publish"), (IdxReader, "read")]
    names = {"publish": "commit", "read": "read_images"}
    with contextlib.ExitStack() as stack:
        for owner, attribute in targets:
            name = names.get(attribute, attribute)
            stack.enter_context(mock.patch.object(owner, attribute, timed(name, getattr(owner, attribute))))
        yield


def timed_ingest(spark, source: str, output: str, **kwargs) -> dict[str, Any]:
    """``spark_mnist.driver.ingest.ingest(spark, source, output, dataset="fashion-mnist", **kwargs)``, timed: seconds, its
    stages (:func:`ingest_stages`, plus ``other``: the rest of the call), the training split's rows and the
    driver's peak RSS during it (this Python process only: the JVM and Spark's Python workers are other processes;
    None where it cannot be reset)."""
    from spark_mnist.driver.ingest import ingest

    can_reset = reset_peak_rss()
    stages: dict[str, float] = {}
    with stopwatch() as t, ingest_stages(stages):
        manifest = ingest(spark, source, output, dataset="fashion-mnist", **kwargs)
    stages["other"] = max(0.0, t["seconds"] - sum(stages.values()))
    return {"seconds": t["seconds"], "stages": stages, "train_rows": manifest.splits["train"].rows,
            "driver_peak_rss_mb": vm_hwm_mb() if can_reset else None}


@contextlib.contextmanager
def s3_endpoint(bucket: str = "spark-mnist-bench") -> Iterator[str]:
    """An S3 endpoint for the S3 rows, given as the standard variables give it; yields ``s3://<bucket>``.

    Where ``AWS_ENDPOINT_URL`` is set (an S3-compatible store: MinIO, Ceph, a cloud endpoint), that store with its
    credentials from the AWS chain, and ``bucket`` must exist.  Else moto's S3 server (``moto[server]``, the dev
    extra), started here on 127.0.0.1 with a new bucket, and ``AWS_ENDPOINT_URL`` and test credentials set in this
    process's environment while the block runs (Spark's workers started inside it inherit them).

    Raises:
        ModuleNotFoundError: no ``AWS_ENDPOINT_URL`` and moto is not installed.
    """
    if os.environ.get("AWS_ENDPOINT_URL"):
        yield f"s3://{bucket}"
        return
    from moto.server import ThreadedMotoServer
    from pyarrow import fs as pafs

    from spark_mnist.envs import scoped_env

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        with scoped_env(env):
            store = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", access_key="testing",
                                      secret_key="testing", region="us-east-1", allow_bucket_creation=True)
            store.create_dir(bucket)
            yield f"s3://{bucket}"
    finally:
        server.stop()


def quiet_logs() -> None:
    """INFO for the benchmarks, WARNING elsewhere; silence petastorm's and py4j's chatter and the deprecation
    warnings of petastorm/pandas (they say nothing about speed)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # pandas' SettingWithCopyWarning from petastorm's TransformSpec path, matched by text: importing pandas here
    # would hide the cost of the loaders that import it.
    warnings.filterwarnings("ignore", message=r"\s*A value is trying to be set on a copy")
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # petastorm's, per batch
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    for name in ("py4j", "petastorm", "werkzeug"):  # werkzeug: moto's server logs every request
        logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------------------- output

def fmt_num(value: Any, digits: int = 0) -> str:
    """Thousands-separated number, ``-`` for None, strings as they are."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def emit_json(payload: dict[str, Any]) -> None:
    """The one machine-readable line, last on stdout."""
    def clean(v):
        if isinstance(v, float):
            return round(v, 4) if abs(v) < 1000 else round(v, 1)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    sys.stdout.flush()
    print(json.dumps(clean(payload)), flush=True)
