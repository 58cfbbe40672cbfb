"""Shared helpers of the benchmarks: timing epochs, consuming batches the same way, peak RSS of a child process,
Spark/petastorm set-up, the aligned table and the final JSON line.

Nothing here is part of the ``spark_mnist`` package; run the scripts from the repository root with
``python -m benchmarks.<name>``.
"""

from __future__ import annotations

import contextlib
import itertools
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
from typing import Any, Callable, Iterable, Iterator, Sequence

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
BATCH_SIZE = 256
IMAGE_SHAPE = (28, 28)
# Fashion-MNIST training-set pixel mean and standard deviation (of x / 255).
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
DEFAULT_PETASTORM_ROW_GROUP_BYTES = 2**20  # TrainSettings.petastorm_row_group_bytes

log = logging.getLogger("benchmarks")


# --------------------------------------------------------------------------------------------------- timing

@dataclass
class Epochs:
    """Per-epoch ``(samples, seconds)`` of one loader; epoch 0 is the cold one."""

    samples: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    setup_seconds: float = 0.0

    def rates(self) -> list[float]:
        return [n / s if s > 0 else float("inf") for n, s in zip(self.samples, self.seconds)]

    def summary(self) -> dict[str, Any]:
        """cold = epoch 0 (plus ``setup_seconds``, e.g. opening the files); warm = median of the later epochs, or the
        cold figure when only one epoch ran (``warm_is_cold``)."""
        cold = self.samples[0] / (self.seconds[0] + self.setup_seconds)
        warm_rates = self.rates()[1:]
        return {
            "cold_samples_per_s": cold,
            "warm_samples_per_s": statistics.median(warm_rates) if warm_rates else cold,
            "warm_is_cold": not warm_rates,
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


def split_epochs(batches: Iterator, steps: int, epochs: int) -> Iterator[Iterator]:
    """Cut one endless batch stream into ``epochs`` epochs of ``steps`` batches (petastorm's ``num_epochs=None``)."""
    for _ in range(epochs):
        yield itertools.islice(batches, steps)


@contextlib.contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """``with stopwatch() as t: ...`` then ``t["seconds"]``."""
    t = {"seconds": float("nan")}
    started = time.perf_counter()
    try:
        yield t
    finally:
        t["seconds"] = time.perf_counter() - started


@contextlib.contextmanager
def stage_timers(module, names: Sequence[str]) -> Iterator[dict[str, float]]:
    """Time calls of ``module``'s functions ``names`` while open (summed per name, in seconds), by wrapping them
    in the module's namespace; the wrappers are removed on exit.  Attribution only: the module's own code runs
    unchanged."""
    totals = {name: 0.0 for name in names}
    originals = {name: getattr(module, name) for name in names}

    def wrap(name, fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - started
        return timed

    for name, fn in originals.items():
        setattr(module, name, wrap(name, fn))
    started = time.perf_counter()
    try:
        yield totals
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)
        totals["other"] = time.perf_counter() - started - sum(totals[n] for n in names)


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn``, in seconds."""
    times = []
    for _ in range(repeats):
        with stopwatch() as t:
            fn()
        times.append(t["seconds"])
    return min(times)


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


def _call_and_measure(fn: Callable, args: tuple, torch_threads: int | None) -> tuple[Any, float, int]:
    quiet_logs()
    import torch  # a training process has torch loaded before its loader starts: not a loader cost

    if torch_threads:
        torch.set_num_threads(torch_threads)
    result = fn(*args)
    return result, peak_rss_mb(), torch.get_num_threads()


def combine_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Repeated runs of one loader (each in a fresh process): median cold and warm figures, largest peak RSS, and
    the runs themselves under ``runs``."""
    first = runs[0]
    return {
        **first,
        "cold_samples_per_s": statistics.median(r["cold_samples_per_s"] for r in runs),
        "warm_samples_per_s": statistics.median(r["warm_samples_per_s"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "epoch_seconds": [r["epoch_seconds"] for r in runs],
        "repeats": len(runs),
    }


def run_in_child(fn: Callable, *args, torch_threads: int | None = None) -> dict[str, Any]:
    """Run ``fn(*args)`` (a module-level function returning a dict) in a fresh ``spawn`` process, so each loader
    starts from the same state and its peak RSS is its own; ``torch_threads`` sets torch's intra-op threads there
    (default: torch's default).  Returns ``fn``'s dict plus ``peak_rss_mb`` and ``torch_threads``.  Exceptions
    raised in the child are re-raised here."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        result, rss, threads = pool.submit(_call_and_measure, fn, args, torch_threads).result()
    return {**result, "peak_rss_mb": round(rss, 1), "torch_threads": threads}


# --------------------------------------------------------------------------------------------------- data

def parse_idx_files(source: str, names: Sequence[str] = IDX_FILES) -> dict[str, Any]:
    """``{name: array}`` for the gz IDX files ``names`` under ``source`` (decompressed and parsed, no Spark)."""
    from spark_mnist.idx import parse_idx

    return {name: parse_idx(os.path.join(source, name)).array for name in names}


def train_tensors(source: str):
    """The training split as it comes out of the gz files: uint8 images (N, 1, 28, 28) and int64 labels (N,)."""
    import torch

    arrays = parse_idx_files(source, (TRAIN_IMAGES, TRAIN_LABELS))
    images = torch.from_numpy(arrays[TRAIN_IMAGES]).view(-1, 1, *IMAGE_SHAPE)
    labels = torch.from_numpy(arrays[TRAIN_LABELS].astype("int64"))
    return images, labels


def measure_shard_loader(paths: Sequence[str], epochs: int, *, batch_size: int = BATCH_SIZE, rank: int = 0,
                         world_size: int = 1, loader_cls: type | None = None, **loader_kwargs) -> dict[str, Any]:
    """Our :class:`~spark_mnist.loader.ShardLoader` over ``paths``: ``epochs`` full epochs; the first is cold
    (reads the Parquet files; the constructor's metadata reads count in it), the rest warm when the shard is
    held in memory.  Streaming loaders run one epoch only (every epoch reads the files again).  ``loader_cls``
    replaces :class:`~spark_mnist.loader.ShardLoader` (a subclass)."""
    from spark_mnist.loader import ShardLoader

    with stopwatch() as setup:
        loader = (loader_cls or ShardLoader)(paths, rank=rank, world_size=world_size, batch_size=batch_size,
                                             **loader_kwargs)
    with loader:
        def epoch(e):
            loader.set_epoch(e)
            return iter(loader)
        result = time_epochs((epoch(e) for e in range(epochs if loader.in_memory else 1)),
                             setup_seconds=setup["seconds"])
    return {**result.summary(), "in_memory": loader.in_memory, "rows": loader.rows,
            "row_groups": len(loader.plan)}


def row_ours(paths: Sequence[str], epochs: int) -> dict[str, Any]:
    """Our loader as it is (run it with :func:`run_in_child`)."""
    return measure_shard_loader(paths, epochs)


def row_ours_proposed(paths: Sequence[str], epochs: int) -> dict[str, Any]:
    """Our loader with the fixes of :mod:`benchmarks.proposed` (run it with :func:`run_in_child`)."""
    from benchmarks.proposed import ProposedShardLoader, patched

    with patched():
        return measure_shard_loader(paths, epochs, loader_cls=ProposedShardLoader)


# --------------------------------------------------------------------------------------------------- Spark

@contextlib.contextmanager
def bench_spark(master: str = "local[2]") -> Iterator["SparkSession"]:  # noqa: F821
    """A fresh local SparkSession as the CLI makes it (``spark_mnist.launch.spark_session``)."""
    from spark_mnist.config import SparkSettings
    from spark_mnist.launch import spark_session

    with spark_session(SparkSettings(master=master, app_name="spark-mnist-bench")) as spark:
        yield spark


def make_converter(spark, data_dir: str, cache_dir: str,
                   row_group_bytes: int = DEFAULT_PETASTORM_ROW_GROUP_BYTES, split: str = "train",
                   compression_codec: str | None = None):
    """petastorm's converter for ``data_dir/split``, as :func:`spark_mnist.launch.train` makes it (which leaves
    ``compression_codec`` to Spark's default, snappy)."""
    from petastorm.spark import SparkDatasetConverter, make_spark_converter

    spark.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, "file://" + os.path.abspath(cache_dir))
    return make_spark_converter(spark.read.parquet(f"file://{os.path.abspath(data_dir)}/{split}"),
                                parquet_row_group_size_bytes=row_group_bytes, compression_codec=compression_codec)


def quiet_logs() -> None:
    """INFO for the benchmarks, WARNING elsewhere; silence petastorm's and py4j's chatter and the deprecation
    warnings of petastorm/pandas (they say nothing about speed)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # pandas' SettingWithCopyWarning from petastorm's TransformSpec path, matched by text: importing pandas here
    # would hide the cost of the loaders that import it.
    warnings.filterwarnings("ignore", message=r"\s*A value is trying to be set on a copy")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    for name in ("py4j", "petastorm"):
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
