"""Scale benchmark: ingest and our loader on synthetic datasets K x Fashion-MNIST (:mod:`benchmarks.make_synthetic`).

For every scale (default 1 10 100): generate the four gz IDX files if the cache lacks them, ingest them with
``spark_mnist.driver.ingest.ingest(..., chunk_rows=--chunk-rows)`` in one local[2] Spark session (session start and, by
default, one untimed warm-up ingest of Fashion-MNIST excluded, so every scale's figure is a warm ingest), recording
the driver's peak RSS during each ingest (it holds at most ``chunk_rows`` images at a time, so it stays flat as K
grows).  Then our loader reads the ingested training shards in a fresh ``spawn`` process: rank 0 of world size 1,
batch 256, ``--epochs`` epochs.  Where the rank's share fits the memory budget (``--memory-budget-mb``, default the
library's 2 GiB, i.e. up to about 2.6M rows) epoch 1 is cold and the later ones warm (in memory); past it the
loader streams row groups every epoch, and each epoch's streaming rate is reported.  A scale that fails is reported
with its error and the others go on.

The commit on an object store: the scales of ``--s3-scales`` (default 1 and 10) are ingested again, in the same
session, into an S3 endpoint (``AWS_ENDPOINT_URL`` where set, else moto's server started here:
:func:`benchmarks.common.s3_endpoint`), and the commit's seconds (the manifest's one PUT and the clean-up) are
printed beside the ingest's total: a commit's cost that does not grow with the dataset.

Time on this 2-core machine (a full run): generating x100 (6M rows, 2.6 GB of gz) takes about 1.5 min (once;
cached in ``--cache-dir``), its ingest about 1 min (6 chunks of 1M rows; driver peak RSS ~1.7 GB: one chunk plus
its pickled broadcast) and 3 streamed epochs about 40 s; x1 and x10 together under a minute.  A first full run
takes about 6 minutes, with ~8 GB free under ``--cache-dir`` (synthetic gz files plus the x100 shards, deleted at
the end).

Full run: ``python -m benchmarks.bench_scale``.  Smoke test: ``python -m benchmarks.bench_scale --scales 2
--no-warmup --epochs 2 --chunk-rows 50000``.  Prints two tables and one JSON line last.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from typing import Any

from benchmarks.common import (FASHION_MNIST_DIR, bench_spark, emit_json, fmt_num, fmt_stages, log, quiet_logs,
                               row_ours, run_in_child, s3_endpoint, stopwatch, table, timed_ingest)
from benchmarks.make_synthetic import ensure_synthetic
from spark_mnist import fs, open_dataset
from spark_mnist.paths import normalize_uri
from spark_mnist.driver.ingest import DEFAULT_CHUNK_ROWS
from spark_mnist.rank.loader import DEFAULT_MEMORY_BUDGET_BYTES

DEFAULT_CACHE_DIR = "/tmp/spark-mnist-bench"


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def ingest_scales(scales: list[int], cache: str, synthetic: dict[int, str], chunk_rows: int,
                  warmup_source: str | None, s3_scales: list[int], s3_root: str | None) -> dict[int, dict[str, Any]]:
    """Ingest every scale's synthetic files into ``cache/parquet-xK`` in one session; per scale: seconds, stage
    seconds, driver peak RSS (see :func:`benchmarks.common.timed_ingest`), or ``ingest_error``; then each of
    ``s3_scales`` into ``s3_root/parquet-xK``: ``s3_ingest_seconds`` and ``s3_commit_seconds``, or ``s3_error``."""
    out: dict[int, dict[str, Any]] = {}
    with bench_spark() as spark:
        if warmup_source:
            log.info("warm-up ingest of %s (not timed)", warmup_source)
            timed_ingest(spark, warmup_source, os.path.join(cache, "parquet-warmup"))
            shutil.rmtree(os.path.join(cache, "parquet-warmup"), ignore_errors=True)
        for k in scales:
            target = os.path.join(cache, f"parquet-x{k}")
            log.info("ingesting x%d (chunk_rows %d) ...", k, chunk_rows)
            try:
                figures = timed_ingest(spark, synthetic[k], target, chunk_rows=chunk_rows)
                out[k] = {"ingest_seconds": figures["seconds"], "ingest_stages": figures["stages"],
                          "ingest_driver_peak_rss_mb": figures["driver_peak_rss_mb"], "parquet_dir": target}
            except Exception as e:  # noqa: BLE001  report the failure of this scale, go on with the others
                log.warning("x%d: ingest failed: %s", k, _error(e))
                out[k] = {"ingest_error": _error(e)}
            log.info("x%d: %s", k, out[k])
        for k in s3_scales if s3_root else []:
            target = f"{s3_root}/parquet-x{k}"
            log.info("ingesting x%d into %s ...", k, target)
            try:
                figures = timed_ingest(spark, synthetic[k], target, chunk_rows=chunk_rows)
                out[k].update(s3_ingest_seconds=figures["seconds"], s3_commit_seconds=figures["stages"]["commit"])
            except Exception as e:  # noqa: BLE001
                log.warning("x%d on S3: ingest failed: %s", k, _error(e))
                out[k]["s3_error"] = _error(e)
            finally:
                fs.delete(normalize_uri(target))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100], help="K values (default 1 10 100)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                        help=f"synthetic files (kept) and ingested shards (default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--source", default=FASHION_MNIST_DIR, help="Fashion-MNIST's gz IDX files")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
                        help=f"ingest's chunk_rows: images held on the driver at a time "
                             f"(default {DEFAULT_CHUNK_ROWS:,})")
    parser.add_argument("--epochs", type=int, default=3,
                        help="loader epochs: 1 cold + the rest warm, or all streamed past the budget (default 3)")
    parser.add_argument("--memory-budget-mb", type=int, default=DEFAULT_MEMORY_BUDGET_BYTES // 2**20,
                        help="the loader's memory_budget_bytes, in MiB: streams past it (default "
                             f"{DEFAULT_MEMORY_BUDGET_BYTES // 2**20})")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up ingest")
    parser.add_argument("--s3-scales", type=int, nargs="*", default=[1, 10],
                        help="scales also ingested into the S3 endpoint, for the commit's seconds (default 1 10; "
                             "none: no S3 row)")
    parser.add_argument("--keep-parquet", action="store_true", help="keep the ingested shards")
    args = parser.parse_args(argv)
    if min(args.scales) < 1 or args.epochs < 1 or args.chunk_rows < 1 or args.memory_budget_mb < 0:
        parser.error("--scales, --epochs and --chunk-rows must be at least 1, --memory-budget-mb at least 0")
    quiet_logs()
    scales = list(dict.fromkeys(args.scales))
    os.makedirs(args.cache_dir, exist_ok=True)

    results: dict[int, dict[str, Any]] = {}
    synthetic: dict[int, str] = {}
    for k in scales:
        synthetic[k] = os.path.join(args.cache_dir, f"synthetic-x{k}")
        with stopwatch() as t:
            marker, now = ensure_synthetic(k, synthetic[k], args.source)
        results[k] = {"generate_seconds": t["seconds"] if now else None, "cached": not now,
                      "train_images_gz_mb": marker["bytes"]["train-images-idx3-ubyte.gz"] / 2**20,
                      "train_rows": marker["train_rows"]}

    s3_scales = [k for k in dict.fromkeys(args.s3_scales) if k in synthetic]
    with s3_endpoint() if s3_scales else contextlib.nullcontext() as s3_root:
        ingested = ingest_scales(scales, args.cache_dir, synthetic, args.chunk_rows,
                                 None if args.no_warmup else args.source, s3_scales, s3_root)
    try:
        for k in scales:
            results[k].update(ingested[k])
            if "ingest_error" in results[k]:
                continue
            paths = open_dataset(results[k]["parquet_dir"]).files("train")
            log.info("x%d: loader ...", k)
            try:
                results[k]["ours"] = run_in_child(row_ours, paths, args.epochs, args.memory_budget_mb * 2**20)
            except Exception as e:  # noqa: BLE001
                log.warning("x%d: loader failed: %s", k, _error(e))
                results[k]["ours"] = {"error": _error(e)}
            log.info("x%d: loader: %s", k, results[k]["ours"])
    finally:
        if not args.keep_parquet:
            for k in scales:
                shutil.rmtree(os.path.join(args.cache_dir, f"parquet-x{k}"), ignore_errors=True)
    report(results, args.chunk_rows, args.memory_budget_mb, warm=not args.no_warmup)
    return 0


def report(results: dict[int, dict[str, Any]], chunk_rows: int, budget_mb: int, warm: bool) -> None:
    """Print the ingest and loader tables, then the JSON line."""
    ingest_lines, loader_lines, s3_lines = [], [], []
    payload: dict[str, Any] = {"chunk_rows": chunk_rows, "memory_budget_mb": budget_mb, "scales": {}}
    for k, r in results.items():
        ingest_lines.append([f"x{k}", fmt_num(r["train_rows"]), fmt_num(r["train_images_gz_mb"]),
                             "cached" if r["cached"] else f"{r['generate_seconds']:.1f}",
                             r.get("ingest_error") or f"{r['ingest_seconds']:.1f}",
                             fmt_num(r["train_rows"] / r["ingest_seconds"]) if "ingest_seconds" in r else "-",
                             fmt_num(r.get("ingest_driver_peak_rss_mb")), fmt_stages(r.get("ingest_stages", {}))])
        payload[f"ingest_seconds_x{k}"] = r.get("ingest_seconds")
        payload[f"commit_seconds_x{k}"] = r.get("ingest_stages", {}).get("commit")  # the manifest's write + clean-up
        payload[f"ingest_driver_peak_rss_mb_x{k}"] = r.get("ingest_driver_peak_rss_mb")
        if "s3_ingest_seconds" in r or "s3_error" in r:
            s3_lines.append([f"x{k}", fmt_num(r["train_rows"]), r.get("s3_error") or f"{r['s3_ingest_seconds']:.1f}",
                             f"{r['s3_commit_seconds']:.3f}" if "s3_commit_seconds" in r else "-",
                             f"{r['ingest_stages']['commit']:.3f}" if "ingest_stages" in r else "-"])
            payload[f"s3_ingest_seconds_x{k}"] = r.get("s3_ingest_seconds")
            payload[f"s3_commit_seconds_x{k}"] = r.get("s3_commit_seconds")
        m = r.get("ours")
        if m is None or "error" in m:
            loader_lines.append([f"x{k}", "-", (m or {}).get("error") or "not run (ingest failed)", "-", "-", "-"])
        else:
            loader_lines.append([f"x{k}", "yes" if m["in_memory"] else "no (streams)",
                                 fmt_num(m["cold_samples_per_s"]),
                                 fmt_num(m["warm_samples_per_s"]) if m["in_memory"] else "- (streams)",
                                 " / ".join(fmt_num(v) for v in m["epoch_samples_per_s"]), fmt_num(m["peak_rss_mb"])])
            for key in ("cold_samples_per_s", "warm_samples_per_s", "epoch_samples_per_s", "in_memory", "peak_rss_mb"):
                payload[f"ours_{key}_x{k}"] = m[key]
        payload["scales"][str(k)] = {key: v for key, v in r.items() if key != "parquet_dir"}
    print()
    print(f"ingest: one local[2] session{', after a warm-up ingest' if warm else ''}; chunk_rows {chunk_rows:,} "
          f"(~{chunk_rows * 784 / 2**20:,.0f} MiB of images); driver peak RSS = the Python driver's VmHWM during "
          f"that ingest")
    print(table(["scale", "train rows", "train gz MB", "generate s", "ingest s", "ingest rows/s",
                 "driver peak RSS MB", "ingest stages (s)"], ingest_lines))
    print()
    if s3_lines:
        print(f"commit on S3 ({os.environ.get('AWS_ENDPOINT_URL') or 'moto server on 127.0.0.1'}): the manifest's one "
              f"PUT and the clean-up, beside the ingest's total and the local disk's commit")
        print(table(["scale", "train rows", "S3 ingest s", "S3 commit s", "local commit s"], s3_lines))
        print()
    print(f"loader: ours, rank 0 of 1, batch 256, over the ingested training shards; memory budget {budget_mb:,} MiB; "
          f"{os.cpu_count()} CPUs")
    print(table(["scale", "in memory", "cold samples/s", "warm samples/s", "each epoch samples/s", "peak RSS MB"],
                loader_lines))
    emit_json(payload)


if __name__ == "__main__":
    sys.exit(main())
