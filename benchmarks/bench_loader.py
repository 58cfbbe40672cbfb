"""Loader benchmark: one worker (rank 0 of world size 1), batch 256, full epochs of Fashion-MNIST's 60,000-row
training split; and the ingest of the four gz IDX files against the floor of parsing them.

One local[2] Spark session ingests the gz IDX files into a temporary directory (``--ingest-runs`` times: the first
ingest of the session, then later ones replacing it, the best of which is reported); then, in a fresh process, a local Spark Connect server
(``--remote local[2]``) does the same, where this lane's pyspark has Spark Connect (``ingest_connect_seconds``, the
best warm ingest there; its target: at most twice the classic warm ingest) and picks the files the ranks read as training does
(``spark_mnist.driver.converter.choose_converter`` with ``converter: auto``): petastorm's converters
(``spark_mnist.driver.converter.make_converters``) where petastorm works (Spark 3.5, pyarrow < 15), else the ingested
shards directly, and then the petastorm rows are left out with the reason.  Then each loader runs in its own ``spawn``
child (fresh interpreter; its peak RSS is its own):

* ``ours``: ``spark_mnist.rank.loader.ShardLoader`` over the training files (the converter's ``file_urls``, or the
  ingested shards); cold = epoch 1 (reads the Parquet files; the constructor counts in it), warm = median of the
  later epochs (in memory);
* ``ours_resident``: the same with ``device=`` (``--resident-device``, default the CPU standing in for a GPU): the
  split kept on the device, every batch an index gather there (``spark_mnist.rank.loader``); cold and warm as
  ``ours``;
* ``ours_s3``: the same over the same dataset read from an S3 endpoint (``AWS_ENDPOINT_URL`` where set, else moto's
  server started here: :func:`benchmarks.common.s3_endpoint`), the ingested dataset copied there, manifest and all;
* ``in_memory``: torch ``DataLoader(TensorDataset(uint8 images, labels), shuffle=True)`` over the tensors parsed
  from the gz files;
* ``per_sample``: a map-style Dataset over the same tensors whose ``__getitem__`` returns one normalised float
  image, the pattern of the common Databricks how-to;
* ``petastorm`` / ``petastorm_batched``: ``converter.make_torch_dataloader`` with petastorm's default
  ``DataLoader`` / its ``BatchedDataLoader``, through ``spark_mnist.rank.petastorm.petastorm_batches``; ``rows // 256``
  steps per epoch from one endless reader.

Every batch is consumed the same way (:func:`benchmarks.common.consume`).  ``ours`` and ``in_memory`` run in
``--repeats`` fresh processes and report medians.  Prints the loader table, the ingest table and the targets, then
one JSON line last.

Full run (about 10 minutes on 2 cores): ``python -m benchmarks.bench_loader``.  Smoke test (a subset of the
training split, everything else the same): ``python -m benchmarks.bench_loader --rows 5000 --epochs 2
--repeats 1 --petastorm-epochs 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from typing import Any, Iterator

from benchmarks.common import (BATCH_SIZE, FASHION_MNIST_DIR, IMAGE_SHAPE, TRAIN_IMAGES, TRAIN_LABELS, bench_spark,
                               emit_json, fmt_num, fmt_stages, log, parse_idx_files, quiet_logs, row_ours,
                               run_in_child, s3_endpoint, stopwatch, table, time_epochs, timed_ingest)

TARGET_OURS_COLD = 300_000
TARGET_OURS_WARM = 1_000_000
TARGET_WARM_RATIO = 5.0
TARGET_INGEST_OVER_FLOOR = 5.0
TARGET_CONNECT_OVER_CLASSIC = 2.0
CONNECT_REMOTE = "local[2]"
# Fashion-MNIST training-set pixel mean and standard deviation (of x / 255).
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
LOADERS = {  # name: (table label, JSON prefix)
    "ours": ("spark-mnist ShardLoader (ours)", "ours"),
    "ours_resident": ("spark-mnist ShardLoader (ours), resident on the device", "ours_resident"),
    "ours_s3": ("spark-mnist ShardLoader (ours), dataset on S3", "ours_s3"),
    "in_memory": ("in-memory TensorDataset + DataLoader", "in_memory_dataloader"),
    "per_sample": ("per-sample Dataset over gz tensors (float)", "per_sample_dataset"),
    "petastorm": ("petastorm converter, default DataLoader", "petastorm"),
    "petastorm_batched": ("petastorm BatchedDataLoader", "petastorm_batched"),
}
REPEATED = ("ours", "ours_resident", "in_memory")


# ------------------------------------------------------------------------------------------ rows (child processes)

def train_tensors(source: str):
    """The training split as it comes out of the gz files: uint8 images (N, 1, 28, 28) and int64 labels (N,)."""
    import torch

    arrays = parse_idx_files(source, (TRAIN_IMAGES, TRAIN_LABELS))
    images = torch.from_numpy(arrays[TRAIN_IMAGES]).view(-1, 1, *IMAGE_SHAPE)
    labels = torch.from_numpy(arrays[TRAIN_LABELS].astype("int64"))
    return images, labels


class NormalisedImages:
    """Map-style Dataset, one sample per ``__getitem__``: ``((x / 255 - mean) / std)`` as float (1, 28, 28)."""

    def __init__(self, images, labels, mean: float = FASHION_MEAN, std: float = FASHION_STD):
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return (self.images[i].float() / 255 - self.mean) / self.std, self.labels[i]


def row_torch(source: str, epochs: int, per_sample: bool) -> dict[str, Any]:
    """torch's ``DataLoader`` (shuffle, no workers) over the tensors of the gz files: a ``TensorDataset``, or
    :class:`NormalisedImages` with ``per_sample``."""
    from torch.utils.data import DataLoader, TensorDataset

    images, labels = train_tensors(source)
    dataset = NormalisedImages(images, labels) if per_sample else TensorDataset(images, labels)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=0)
    return time_epochs(iter(loader) for _ in range(epochs)).summary()


def row_petastorm(converter, steps: int, epochs: int, batched: bool) -> dict[str, Any]:
    """``epochs`` epochs of ``steps`` batches cut from one endless petastorm reader (``num_epochs=None``)."""
    import itertools

    from spark_mnist.rank.petastorm import petastorm_batches
    from spark_mnist.rank.world import World

    batches = petastorm_batches(converter, world=World(), batch_size=BATCH_SIZE, steps=steps * epochs, batched=batched)
    try:
        result = time_epochs(itertools.islice(batches, steps) for _ in range(epochs))
    finally:
        batches.close()
    return result.summary()


# ------------------------------------------------------------------------------------------ driver

def measure_ingest(source: str, work: str, runs: int) -> tuple[dict[str, Any], Any, list[str]]:
    """Floor (parse the 4 gz files, no Spark; best of 2), then ``runs`` ingests into one directory in one fresh
    session (session start excluded; each later ingest replaces the previous dataset), then the converters where
    petastorm works.  Returns (figures, the training split's converter or ``None``, the training files)."""
    from spark_mnist.shards import contract
    from spark_mnist.config import TrainSettings
    from spark_mnist.driver.converter import choose_converter, make_converters

    floor = []
    for _ in range(2):
        with stopwatch() as t:
            parse_idx_files(source)
        floor.append(t["seconds"])
    data = os.path.join(work, "data")
    figures: dict[str, Any] = {"ingest_floor_seconds": min(floor)}
    with contextlib.ExitStack() as stack:
        with stopwatch() as session_start:
            spark = stack.enter_context(bench_spark())
        figures["spark_session_start_seconds"] = session_start["seconds"]
        ingests = [timed_ingest(spark, source, data) for _ in range(runs)]
        best = min(range(1, runs), key=lambda i: ingests[i]["seconds"]) if runs > 1 else 0
        figures.update(ingest_first_seconds=ingests[0]["seconds"], ingest_seconds=ingests[best]["seconds"],
                       ingest_runs_seconds=[i["seconds"] for i in ingests], ingest_first_stages=ingests[0]["stages"],
                       ingest_stages=ingests[best]["stages"], train_rows=ingests[0]["train_rows"],
                       ingest_driver_peak_rss_mb=max(i["driver_peak_rss_mb"] or 0 for i in ingests) or None)
        choice = choose_converter(TrainSettings())
        figures.update(converter=choice.name, converter_reason=choice.reason, converters_seconds=None)
        if choice.name != "petastorm":
            files = contract.open_dataset(data).files("train")
            figures["converter_files"] = len(files)
            return figures, None, files
        with stopwatch() as t:
            converters = make_converters(spark, contract.open_dataset(data),
                                         "file://" + os.path.abspath(os.path.join(work, "petastorm")),
                                         TrainSettings().petastorm_row_group_bytes)
        figures["converters_seconds"] = t["seconds"]
    figures["converter_files"] = len(converters["train"].file_urls)
    return figures, converters["train"], list(converters["train"].file_urls)


def connect_ingests(source: str, output: str, runs: int) -> dict[str, Any]:
    """``runs`` ingests into ``output`` over a local Spark Connect server started in this process (start
    excluded), as :func:`measure_ingest` does classic.  Run it with :func:`run_in_child` (a process holds one kind of
    session)."""
    with bench_spark(remote=CONNECT_REMOTE) as spark:
        ingests = [timed_ingest(spark, source, output) for _ in range(runs)]
    best = min(range(1, runs), key=lambda i: ingests[i]["seconds"]) if runs > 1 else 0
    return {"ingest_connect_first_seconds": ingests[0]["seconds"], "ingest_connect_seconds": ingests[best]["seconds"],
            "ingest_connect_runs_seconds": [i["seconds"] for i in ingests],
            "ingest_connect_stages": ingests[best]["stages"]}


def measure_connect_ingest(source: str, work: str, runs: int) -> dict[str, Any]:
    """:func:`connect_ingests` in a fresh process, or the figures ``None`` with ``ingest_connect_missing`` saying
    why (a lane whose pyspark lacks Spark Connect, e.g. spark35 without the ``connect`` extra)."""
    try:
        figures = run_in_child(connect_ingests, source, os.path.join(work, "data-connect"), runs)
    except Exception as e:  # noqa: BLE001 - reported in the table and the JSON instead
        log.info("no Spark Connect ingest: %s: %s", type(e).__name__, e)
        return {"ingest_connect_first_seconds": None, "ingest_connect_seconds": None, "ingest_connect_stages": None,
                "ingest_connect_missing": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return {key: figures[key] for key in ("ingest_connect_first_seconds", "ingest_connect_seconds",
                                          "ingest_connect_runs_seconds", "ingest_connect_stages")}


def copy_to(dataset: str, uri: str) -> list[str]:
    """The ingested ``dataset`` (a local directory: manifest, generation and shards) copied to ``uri`` on an object
    store; returns the training files its manifest names there (:func:`spark_mnist.open_dataset`)."""
    from pyarrow import fs as pafs

    from spark_mnist import fs, open_dataset
    from spark_mnist.paths import normalize_uri

    store, path = fs.filesystem(normalize_uri(uri))
    pafs.copy_files(dataset, path, destination_filesystem=store)
    return open_dataset(uri).files("train")


def subset_source(source: str, rows: int | None, work: str) -> str:
    """``source``, or with ``rows`` a copy of it holding only the first ``rows`` training rows (in ``work``)."""
    if rows is None:
        return source
    from benchmarks.make_synthetic import make_synthetic

    out = os.path.join(work, "source")
    make_synthetic(1, out, source, rows=rows)
    return out


def run_rows(names: list[str], jobs: dict[str, tuple], repeats: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each row's median figures over its fresh processes (``repeats`` for :data:`REPEATED`, else 1)."""
    import statistics

    for name in names:
        fn, *fn_args = jobs[name]
        runs = []
        for _ in range(repeats if name in REPEATED else 1):
            runs.append(run_in_child(fn, *fn_args))
            log.info("row %s: cold %s, warm %s samples/s, epochs %s s", name, fmt_num(runs[-1]["cold_samples_per_s"]),
                     fmt_num(runs[-1]["warm_samples_per_s"]), runs[-1]["epoch_seconds"])
        warm = [r["warm_samples_per_s"] for r in runs if r["warm_samples_per_s"] is not None]
        yield name, {**runs[0], "cold_samples_per_s": statistics.median(r["cold_samples_per_s"] for r in runs),
                     "warm_samples_per_s": statistics.median(warm) if warm else None,
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                     "epoch_seconds": [r["epoch_seconds"] for r in runs], "processes": len(runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_loader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=FASHION_MNIST_DIR, help="directory of the 4 gz IDX files")
    parser.add_argument("--rows", type=int, default=None,
                        help="smoke test: use only the first ROWS training rows (for ingest and every loader); "
                             "default all")
    parser.add_argument("--epochs", type=int, default=4,
                        help="epochs of the ours, in-memory and per-sample rows: 1 cold + the rest warm (default 4)")
    parser.add_argument("--petastorm-epochs", type=int, default=2,
                        help="epochs of the petastorm rows from one endless reader; 1 gives no warm figure "
                             "(default 2)")
    parser.add_argument("--repeats", type=int, default=3,
                        help=f"fresh processes for each of {', '.join(REPEATED)}; medians are reported (default 3)")
    parser.add_argument("--ingest-runs", type=int, default=3,
                        help="ingests in each session, classic and Spark Connect; the best after the first is "
                             "reported (default 3)")
    parser.add_argument("--loaders", default=",".join(LOADERS),
                        help=f"comma-separated subset of {', '.join(LOADERS)} (default all)")
    parser.add_argument("--resident-device", default="cpu",
                        help="device of the ours_resident row (default cpu, standing in for a GPU; e.g. cuda)")
    parser.add_argument("--work-dir", default=None, help="where to ingest (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep a temporary work directory")
    args = parser.parse_args(argv)
    names = [r for r in args.loaders.split(",") if r]
    unknown = set(names) - set(LOADERS)
    if unknown:
        parser.error(f"unknown loaders: {', '.join(sorted(unknown))}")
    if min(args.epochs, args.petastorm_epochs, args.repeats, args.ingest_runs) < 1:
        parser.error("--epochs, --petastorm-epochs, --repeats and --ingest-runs must be at least 1")
    if args.rows is not None and args.rows < BATCH_SIZE:
        parser.error(f"--rows must be at least the batch size, {BATCH_SIZE}")
    quiet_logs()

    work = args.work_dir or tempfile.mkdtemp(prefix="spark-mnist-bench-")
    os.makedirs(work, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if not args.keep and not args.work_dir:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
        source = subset_source(args.source, args.rows, work)
        log.info("ingesting %s into %s (%d runs), then the converters where petastorm works", source, work,
                 args.ingest_runs)
        figures, converter, train_files = measure_ingest(source, work, args.ingest_runs)
        log.info("ingesting %s again over a local Spark Connect server (%d runs)", source, args.ingest_runs)
        figures.update(measure_connect_ingest(source, work, args.ingest_runs))
        log.info("converter: %s (%s)", figures["converter"], figures["converter_reason"])
        if converter is None and any(name.startswith("petastorm") for name in names):
            log.info("petastorm rows left out: %s", figures["converter_reason"])
            names = [name for name in names if not name.startswith("petastorm")]
        steps = figures["train_rows"] // BATCH_SIZE
        s3 = s3_endpoint() if "ours_s3" in names else contextlib.nullcontext()
        s3_root = stack.enter_context(s3)
        jobs = {
            "ours": (row_ours, train_files, args.epochs),
            "ours_resident": (row_ours, train_files, args.epochs, None, args.resident_device),
            "ours_s3": (row_ours, s3_root and copy_to(os.path.join(work, "data"), f"{s3_root}/fashion-mnist"),
                        args.epochs),
            "in_memory": (row_torch, source, args.epochs, False),
            "per_sample": (row_torch, source, args.epochs, True),
            "petastorm": (row_petastorm, converter, steps, args.petastorm_epochs, False),
            "petastorm_batched": (row_petastorm, converter, steps, args.petastorm_epochs, True),
        }
        results = dict(run_rows(names, jobs, args.repeats))
    report(figures, results)
    return 0


def report(figures: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    """Print the loader table, the ingest table and the targets, then the JSON line."""
    ours_warm = results.get("ours", {}).get("warm_samples_per_s")
    lines, payload = [], {}
    for name, r in results.items():
        label, prefix = LOADERS[name]
        if name == "ours_resident":
            label = f"{label} ({r['device']}{'' if r['resident'] else ': did not fit, copied'})"
            payload["ours_resident_device"], payload["ours_resident_resident"] = r["device"], r["resident"]
        ratio = ours_warm / r["warm_samples_per_s"] if ours_warm and r["warm_samples_per_s"] else None
        lines.append([label, fmt_num(r["cold_samples_per_s"]), fmt_num(r["warm_samples_per_s"]), fmt_num(ratio, 2),
                      fmt_num(r["peak_rss_mb"]), f"{r['processes']} x {len(r['epoch_seconds'][0])}"])
        for key in ("cold_samples_per_s", "warm_samples_per_s", "peak_rss_mb", "epoch_seconds"):
            payload[f"{prefix}_{key}"] = r[key]
        if name != "ours":
            payload[f"ours_warm_over_{prefix}_warm"] = ratio
    if "in_memory" in results:
        payload["in_memory_dataloader_samples_per_s"] = results["in_memory"]["warm_samples_per_s"]

    threads = sorted({r["torch_threads"] for r in results.values()})
    print()
    print(f"Fashion-MNIST train split, {figures['train_rows']:,} rows ({figures['converter_files']} Parquet files, "
          f"converter {figures['converter']}: {figures['converter_reason']}), rank 0 of 1, batch {BATCH_SIZE}; "
          f"{os.cpu_count()} CPUs, torch threads {threads}; medians over processes")
    print(table(["loader", "cold samples/s", "warm samples/s", "ratio (ours warm / warm)", "peak RSS MB",
                 "processes x epochs"], lines))
    print()
    floor = figures["ingest_floor_seconds"]
    print(table(["ingest (4 gz files -> Parquet shards)", "seconds", "x floor", "stages (s)"], [
        ["floor: parse_idx of the 4 gz files, no Spark", f"{floor:.2f}", "1.00", "-"],
        ["first ingest in a fresh session", f"{figures['ingest_first_seconds']:.2f}",
         f"{figures['ingest_first_seconds'] / floor:.2f}", fmt_stages(figures["ingest_first_stages"])],
        ["warm ingest, same session (best after the first)", f"{figures['ingest_seconds']:.2f}",
         f"{figures['ingest_seconds'] / floor:.2f}", fmt_stages(figures["ingest_stages"])],
    ] + ([
        ["first ingest over Spark Connect (local server)", f"{figures['ingest_connect_first_seconds']:.2f}",
         f"{figures['ingest_connect_first_seconds'] / floor:.2f}", "-"],
        ["warm ingest over Spark Connect (best after the first)", f"{figures['ingest_connect_seconds']:.2f}",
         f"{figures['ingest_connect_seconds'] / floor:.2f}", fmt_stages(figures["ingest_connect_stages"])],
    ] if figures.get("ingest_connect_seconds") is not None else [
        ["over Spark Connect: not in this lane", "-", "-", figures.get("ingest_connect_missing", "-")],
    ])))
    print(f"(not in the figures above: Spark session start {figures['spark_session_start_seconds']:.2f} s; "
          f"petastorm converters, train + test, {fmt_num(figures['converters_seconds'], 2)} s; driver peak RSS during "
          f"ingest {fmt_num(figures['ingest_driver_peak_rss_mb'])} MB)")
    print()
    targets = check_targets(figures, results)
    for text, ok in targets:
        print(f"{'PASS' if ok else 'MISS'}  {text}")
    payload.update(figures)
    payload["targets_met"] = all(ok for _, ok in targets)
    payload["targets_missed"] = [text for text, ok in targets if not ok]
    emit_json(payload)


def check_targets(figures: dict[str, Any], results: dict[str, dict[str, Any]]) -> list[tuple[str, bool]]:
    """``(description, met)`` for each target."""
    checks = []
    if "ours" in results:
        cold, warm = results["ours"]["cold_samples_per_s"], results["ours"]["warm_samples_per_s"] or 0.0
        checks.append((f"ours cold {cold:,.0f} >= {TARGET_OURS_COLD:,} samples/s", cold >= TARGET_OURS_COLD))
        checks.append((f"ours warm {warm:,.0f} >= {TARGET_OURS_WARM:,} samples/s", warm >= TARGET_OURS_WARM))
        if results.get("in_memory", {}).get("warm_samples_per_s"):
            ratio = warm / results["in_memory"]["warm_samples_per_s"]
            checks.append((f"ours warm / in-memory DataLoader warm = {ratio:.2f} >= {TARGET_WARM_RATIO}",
                           ratio >= TARGET_WARM_RATIO))
    over = figures["ingest_seconds"] / figures["ingest_floor_seconds"]
    checks.append((f"warm ingest {figures['ingest_seconds']:.2f} s = {over:.2f} x floor "
                   f"({figures['ingest_floor_seconds']:.2f} s) <= {TARGET_INGEST_OVER_FLOOR} x",
                   over <= TARGET_INGEST_OVER_FLOOR))
    if figures.get("ingest_connect_seconds") is not None:
        ratio = figures["ingest_connect_seconds"] / figures["ingest_seconds"]
        checks.append((f"warm ingest over Spark Connect {figures['ingest_connect_seconds']:.2f} s = {ratio:.2f} x "
                       f"classic ({figures['ingest_seconds']:.2f} s) <= {TARGET_CONNECT_OVER_CLASSIC} x",
                       ratio <= TARGET_CONNECT_OVER_CLASSIC))
    return checks


if __name__ == "__main__":
    sys.exit(main())
