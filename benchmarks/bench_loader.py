"""Loader benchmark: one worker (rank 0 of world size 1), batch 256, full epochs of Fashion-MNIST's 60,000-row
training split.

One local[2] Spark session ingests the gz IDX files into a temporary directory (twice: the first ingest of the
session, then a second one replacing it) and makes petastorm's converter for the training split, as
``spark_mnist.launch.train`` does.  Then each loader runs in its own ``spawn`` child (fresh interpreter; its peak
RSS is its own):

* ``spark-mnist ShardLoader``: ours, over ``converter.file_urls``; cold = epoch 1 (reads the Parquet files; the
  constructor counts in it), warm = median of the later epochs (in memory);
* diagnostics, not counted in the targets: ours with ``torch.set_num_threads(1)``; ours with the fixes of
  :mod:`benchmarks.proposed`; the same over a second converter written with ``compression_codec="uncompressed"``;
* ``in-memory TensorDataset``: torch ``DataLoader(TensorDataset(uint8 images, labels), shuffle=True)`` over the
  tensors parsed from the gz files;
* ``per-sample Dataset (float)``: a map-style Dataset whose ``__getitem__`` returns one normalised float image,
  the pattern of the common Databricks how-to;
* ``petastorm DataLoader`` / ``petastorm BatchedDataLoader``: ``converter.make_torch_dataloader`` through
  ``spark_mnist.loader.petastorm_batches``, ``60000 // 256`` steps per epoch from one endless reader.

Every batch is consumed the same way (:func:`benchmarks.common.consume`).  The cheap rows run in ``--repeats``
fresh processes and report medians.  Prints a table, the ingest figures, the targets, and one JSON line last.
Usage: ``python -m benchmarks.bench_loader [--rows ours,in_memory] [--epochs 4] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from typing import Any

from benchmarks.common import (BATCH_SIZE, FASHION_MEAN, FASHION_MNIST_DIR, FASHION_STD, bench_spark, best_of,
                               combine_runs, emit_json, fmt_num, log, make_converter, parse_idx_files,
                               quiet_logs, row_ours, row_ours_proposed, run_in_child, split_epochs, stage_timers,
                               stopwatch, table, time_epochs, train_tensors)

TARGET_OURS_COLD = 300_000
TARGET_OURS_WARM = 1_000_000
TARGET_WARM_RATIO = 5.0
TARGET_INGEST_OVER_FLOOR = 5.0
ROWS = ("ours", "ours_torch1", "ours_proposed", "ours_proposed_uncompressed", "in_memory", "per_sample", "petastorm",
        "petastorm_batched")
CHEAP_ROWS = ("ours", "ours_torch1", "ours_proposed", "ours_proposed_uncompressed", "in_memory")


# ------------------------------------------------------------------------------------------ rows (child processes)

def row_in_memory(source: str, epochs: int) -> dict[str, Any]:
    from torch.utils.data import DataLoader, TensorDataset

    images, labels = train_tensors(source)
    loader = DataLoader(TensorDataset(images, labels), batch_size=BATCH_SIZE, shuffle=True, num_workers=0)
    return time_epochs(iter(loader) for _ in range(epochs)).summary()


class NormalisedImages:
    """Map-style Dataset, one sample per ``__getitem__``: ``((x / 255 - mean) / std)`` as float (1, 28, 28)."""

    def __init__(self, images, labels, mean: float = FASHION_MEAN, std: float = FASHION_STD):
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return (self.images[i].float() / 255 - self.mean) / self.std, self.labels[i]


def row_per_sample(source: str, epochs: int) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    images, labels = train_tensors(source)
    loader = DataLoader(NormalisedImages(images, labels), batch_size=BATCH_SIZE, shuffle=True, num_workers=0)
    return time_epochs(iter(loader) for _ in range(epochs)).summary()


def row_petastorm(converter, steps: int, epochs: int, batched: bool) -> dict[str, Any]:
    from spark_mnist.loader import petastorm_batches

    batches = petastorm_batches(converter, rank=0, world_size=1, batch_size=BATCH_SIZE, steps=steps * epochs,
                                batched=batched)
    try:
        result = time_epochs(split_epochs(batches, steps, epochs))
    finally:
        batches.close()
    return result.summary()


# ------------------------------------------------------------------------------------------ driver

INGEST_STAGES = ("read_files", "open_idx_split", "write_shards", "commit")


def measure_ingest(source: str, work: str, runs: int, uncompressed: bool) -> tuple[dict[str, Any], Any, Any]:
    """Floor (parse the 4 gz files, no Spark), then ``runs`` ingests into one directory in one fresh session
    (session start excluded; each later ingest replaces the previous dataset), then the converter (and, with
    ``uncompressed``, a second one writing uncompressed Parquet).  Each ingest's stages are timed too.  Returns
    (figures, converter, uncompressed converter or None)."""
    from spark_mnist import ingest as ingest_module

    floor = best_of(lambda: parse_idx_files(source), 2)
    data = os.path.join(work, "data")
    figures: dict[str, Any] = {"ingest_floor_seconds": floor}
    with contextlib.ExitStack() as stack:
        with stopwatch() as session_start:
            spark = stack.enter_context(bench_spark())
        figures["spark_session_start_seconds"] = session_start["seconds"]
        times, stages = [], []
        for _ in range(runs):
            with stage_timers(ingest_module, INGEST_STAGES) as stage, stopwatch() as t:
                manifest = ingest_module.ingest(spark, source, data, dataset="fashion-mnist")
            times.append(t["seconds"])
            stages.append(stage)
        best = min(range(1, runs), key=times.__getitem__) if runs > 1 else 0
        figures.update(ingest_first_seconds=times[0], ingest_seconds=times[best], ingest_runs_seconds=times,
                       ingest_first_stages=stages[0], ingest_stages=stages[best])
        with stopwatch() as t:
            converter = make_converter(spark, data, os.path.join(work, "petastorm"))
        figures["converter_seconds"] = t["seconds"]
        plain = None
        if uncompressed:
            with stopwatch() as t:
                plain = make_converter(spark, data, os.path.join(work, "petastorm"), compression_codec="uncompressed")
            figures["converter_uncompressed_seconds"] = t["seconds"]
    figures["train_rows"] = manifest["splits"]["train"]["rows"]
    figures["converter_files"] = len(converter.file_urls)
    return figures, converter, plain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_loader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=FASHION_MNIST_DIR, help="directory of the 4 gz IDX files")
    parser.add_argument("--epochs", type=int, default=4,
                        help="epochs of the ours, in-memory and per-sample rows: 1 cold + the rest warm (default 4)")
    parser.add_argument("--petastorm-epochs", type=int, default=2,
                        help="epochs of the petastorm rows from one endless reader; 1 means warm = cold (default 2)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh processes per cheap row (ours, ours_proposed, in_memory); medians are "
                             "reported (default 3)")
    parser.add_argument("--ingest-runs", type=int, default=2, help="ingests in the one session (default 2)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads in every loader's process (default: torch's default)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--work-dir", default=None, help="where to ingest (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep a temporary work directory")
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    if args.epochs < 1 or args.petastorm_epochs < 1 or args.repeats < 1 or args.ingest_runs < 1:
        parser.error("--epochs, --petastorm-epochs, --repeats and --ingest-runs must be at least 1")
    quiet_logs()

    work = args.work_dir or tempfile.mkdtemp(prefix="spark-mnist-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        log.info("ingesting %s into %s (%d runs), then making the petastorm converter", args.source, work,
                 args.ingest_runs)
        figures, converter, plain = measure_ingest(args.source, work, args.ingest_runs,
                                                  "ours_proposed_uncompressed" in rows)
        paths = list(converter.file_urls)
        steps = figures["train_rows"] // BATCH_SIZE
        jobs = {
            "ours": (row_ours, paths, args.epochs),
            "ours_torch1": (row_ours, paths, args.epochs),
            "ours_proposed": (row_ours_proposed, paths, args.epochs),
            "ours_proposed_uncompressed": (row_ours_proposed, list(plain.file_urls) if plain else [], args.epochs),
            "in_memory": (row_in_memory, args.source, args.epochs),
            "per_sample": (row_per_sample, args.source, args.epochs),
            "petastorm": (row_petastorm, converter, steps, args.petastorm_epochs, False),
            "petastorm_batched": (row_petastorm, converter, steps, args.petastorm_epochs, True),
        }
        results: dict[str, dict[str, Any]] = {}
        for name in rows:
            fn, *fn_args = jobs[name]
            repeats = args.repeats if name in CHEAP_ROWS else 1
            threads = 1 if name == "ours_torch1" else args.torch_threads
            runs = []
            for _ in range(repeats):
                runs.append(run_in_child(fn, *fn_args, torch_threads=threads))
                log.info("row %s: cold %s, warm %s samples/s, epochs %s s", name,
                         fmt_num(runs[-1]["cold_samples_per_s"]), fmt_num(runs[-1]["warm_samples_per_s"]),
                         runs[-1]["epoch_seconds"])
            results[name] = combine_runs(runs)
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    report(figures, results)
    return 0


LABELS = {
    "ours": "spark-mnist ShardLoader (ours)",
    "ours_torch1": "ours, torch.set_num_threads(1) (diagnostic)",
    "ours_proposed": "ours + proposed fixes (benchmarks/proposed.py)",
    "ours_proposed_uncompressed": "ours + fixes, uncompressed converter",
    "in_memory": "in-memory TensorDataset + DataLoader",
    "per_sample": "per-sample Dataset, float normalise",
    "petastorm": "petastorm make_torch_dataloader",
    "petastorm_batched": "petastorm BatchedDataLoader",
}
JSON_PREFIX = {"ours": "ours", "ours_torch1": "ours_torch1", "ours_proposed": "ours_proposed",
               "ours_proposed_uncompressed": "ours_proposed_uncompressed", "in_memory": "in_memory_dataloader",
               "per_sample": "per_sample_dataset", "petastorm": "petastorm", "petastorm_batched": "petastorm_batched"}


def report(figures: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    """Print the loader table, the ingest table and the targets, then the JSON line."""
    ours_warm = results.get("ours", {}).get("warm_samples_per_s")
    lines, payload = [], {}
    for name, r in results.items():
        ratio = ours_warm / r["warm_samples_per_s"] if ours_warm else None
        warm = fmt_num(r["warm_samples_per_s"]) + (" (=cold)" if r["warm_is_cold"] else "")
        epochs = len(r["epoch_seconds"][0])
        lines.append([LABELS[name], fmt_num(r["cold_samples_per_s"]), warm, fmt_num(ratio, 2),
                      fmt_num(r["peak_rss_mb"]), f"{r['repeats']} x {epochs}"])
        prefix = JSON_PREFIX[name]
        for key in ("cold_samples_per_s", "warm_samples_per_s", "warm_is_cold", "peak_rss_mb", "epoch_seconds"):
            payload[f"{prefix}_{key}"] = r[key]
        if name != "ours" and ratio is not None:
            payload[f"ours_warm_over_{prefix}_warm"] = ratio
    if "in_memory" in results:
        payload["in_memory_dataloader_samples_per_s"] = results["in_memory"]["warm_samples_per_s"]

    threads = sorted({r["torch_threads"] for r in results.values()})
    print()
    print(f"Fashion-MNIST train split, {figures['train_rows']:,} rows ({figures['converter_files']} converter "
          f"files), rank 0 of 1, batch {BATCH_SIZE}; {os.cpu_count()} CPUs, torch threads {threads}; "
          f"medians over processes")
    print(table(["loader", "cold samples/s", "warm samples/s", "ratio (ours warm / warm)", "peak RSS MB",
                 "processes x epochs"], lines))
    print()
    floor = figures["ingest_floor_seconds"]

    def stages(key):
        return ", ".join(f"{k} {v:.2f}" for k, v in figures[key].items())

    print(table(["ingest", "seconds", "x floor", "stages (s)"], [
        ["floor: parse_idx of the 4 gz files, no Spark", f"{floor:.2f}", "1.00", "-"],
        ["first ingest in a fresh session", f"{figures['ingest_first_seconds']:.2f}",
         f"{figures['ingest_first_seconds'] / floor:.2f}", stages("ingest_first_stages")],
        ["second ingest, same session (replaces)", f"{figures['ingest_seconds']:.2f}",
         f"{figures['ingest_seconds'] / floor:.2f}", stages("ingest_stages")],
        ["petastorm converter (make_spark_converter)", f"{figures['converter_seconds']:.2f}", "-", "-"],
        *([["same, compression_codec='uncompressed'", f"{figures['converter_uncompressed_seconds']:.2f}", "-", "-"]]
          if "converter_uncompressed_seconds" in figures else []),
        ["Spark session start (excluded above)", f"{figures['spark_session_start_seconds']:.2f}", "-", "-"],
    ]))
    print()
    targets = check_targets(figures, results)
    for text, ok in targets:
        print(f"{'PASS' if ok else 'MISS'}  {text}")
    for variant in ("ours_proposed", "ours_proposed_uncompressed"):
        if variant in results:
            for text, ok in check_targets(figures, {**results, "ours": results[variant]}, ingest=False):
                print(f"({'pass' if ok else 'miss'}  {LABELS[variant]}: {text})")
    payload.update(figures)
    payload["targets_met"] = all(ok for _, ok in targets)
    payload["targets_missed"] = [text for text, ok in targets if not ok]
    emit_json(payload)


def check_targets(figures: dict[str, Any], results: dict[str, dict[str, Any]], ingest: bool = True
                  ) -> list[tuple[str, bool]]:
    """``(description, met)`` for each target."""
    checks = []
    if "ours" in results:
        cold, warm = results["ours"]["cold_samples_per_s"], results["ours"]["warm_samples_per_s"]
        checks.append((f"ours cold {cold:,.0f} >= {TARGET_OURS_COLD:,} samples/s", cold >= TARGET_OURS_COLD))
        checks.append((f"ours warm {warm:,.0f} >= {TARGET_OURS_WARM:,} samples/s", warm >= TARGET_OURS_WARM))
        if "in_memory" in results:
            ratio = warm / results["in_memory"]["warm_samples_per_s"]
            checks.append((f"ours warm / in-memory DataLoader warm = {ratio:.2f} >= {TARGET_WARM_RATIO}",
                           ratio >= TARGET_WARM_RATIO))
    if ingest:
        over = figures["ingest_seconds"] / figures["ingest_floor_seconds"]
        checks.append((f"second ingest {figures['ingest_seconds']:.2f} s = {over:.2f} x floor "
                       f"({figures['ingest_floor_seconds']:.2f} s) <= {TARGET_INGEST_OVER_FLOOR} x",
                       over <= TARGET_INGEST_OVER_FLOOR))
    return checks


if __name__ == "__main__":
    sys.exit(main())
