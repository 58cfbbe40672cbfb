"""Scale benchmark: ingest and our loader on synthetic datasets K x Fashion-MNIST (:mod:`benchmarks.make_synthetic`).

For every scale (default 1 10 100): generate the four gz IDX files if the cache lacks them, ingest them with
``spark_mnist.ingest.ingest`` in one local[2] Spark session (session start and, by default, one untimed warm-up
ingest of Fashion-MNIST excluded, so every scale's figure is a warm ingest), then measure our loader on the
ingested training shards in a fresh ``spawn`` process: rank 0 of world size 1, batch 256, cold epoch (reads the
Parquet files) and warm epochs when the rank's share fits the default memory budget (otherwise the loader streams
and one epoch is run).  A scale that fails (ingest parses whole files in driver memory) is reported with its error
and the others go on.

Usage: ``python -m benchmarks.bench_scale --scales 1 10 [--cache-dir /tmp/spark-mnist-bench]``.  Prints two tables
and one JSON line last.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
from typing import Any

from benchmarks.common import (FASHION_MNIST_DIR, bench_spark, emit_json, fmt_num, log, quiet_logs,
                               reset_peak_rss, row_ours, row_ours_proposed, run_in_child, stage_timers, stopwatch,
                               table, vm_hwm_mb)
from benchmarks.make_synthetic import ensure_synthetic

DEFAULT_CACHE_DIR = "/tmp/spark-mnist-bench"
INGEST_STAGES = ("read_files", "open_idx_split", "write_shards", "commit")
LOADERS = {"ours": row_ours, "ours_proposed": row_ours_proposed}


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def ingest_scales(scales: list[int], cache: str, synthetic: dict[int, str], warmup_source: str | None
                  ) -> dict[int, dict[str, Any]]:
    """Ingest every scale's synthetic files into ``cache/parquet-xK`` in one session; per scale: seconds, stage
    seconds, driver peak RSS (the Python driver only; the JVM and the Python workers are other processes), or
    ``error``."""
    from spark_mnist import ingest as ingest_module

    out: dict[int, dict[str, Any]] = {}
    with bench_spark() as spark:
        if warmup_source:
            log.info("warm-up ingest of %s (not timed)", warmup_source)
            ingest_module.ingest(spark, warmup_source, os.path.join(cache, "parquet-warmup"))
            shutil.rmtree(os.path.join(cache, "parquet-warmup"), ignore_errors=True)
        for k in scales:
            target = os.path.join(cache, f"parquet-x{k}")
            can_reset = reset_peak_rss()
            log.info("ingesting x%d ...", k)
            try:
                with stage_timers(ingest_module, INGEST_STAGES) as stages, stopwatch() as t:
                    manifest = ingest_module.ingest(spark, synthetic[k], target, dataset="fashion-mnist")
                out[k] = {"ingest_seconds": t["seconds"], "ingest_stages": stages,
                          "train_rows": manifest["splits"]["train"]["rows"], "parquet_dir": target}
            except Exception as e:  # noqa: BLE001  report the failure of this scale, go on with the others
                log.warning("x%d: ingest failed: %s", k, _error(e))
                out[k] = {"ingest_error": _error(e)}
            out[k]["driver_peak_rss_mb"] = vm_hwm_mb() if can_reset else None
            log.info("x%d: %s", k, out[k])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100], help="K values (default 1 10 100)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                        help=f"synthetic files and ingested shards (default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--source", default=FASHION_MNIST_DIR, help="Fashion-MNIST's gz IDX files")
    parser.add_argument("--epochs", type=int, default=3, help="loader epochs: 1 cold + the rest warm (default 3)")
    parser.add_argument("--loaders", default="ours", help=f"comma-separated subset of {', '.join(LOADERS)}")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads in the loader's process (default: torch's default)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up ingest")
    parser.add_argument("--keep-parquet", action="store_true", help="keep the ingested shards")
    args = parser.parse_args(argv)
    loaders = [name for name in args.loaders.split(",") if name]
    if set(loaders) - set(LOADERS):
        parser.error(f"unknown loaders: {', '.join(sorted(set(loaders) - set(LOADERS)))}")
    if min(args.scales) < 1 or args.epochs < 1:
        parser.error("--scales and --epochs must be at least 1")
    quiet_logs()
    scales = list(dict.fromkeys(args.scales))
    os.makedirs(args.cache_dir, exist_ok=True)

    generated: dict[int, dict[str, Any]] = {}
    synthetic: dict[int, str] = {}
    for k in scales:
        synthetic[k] = os.path.join(args.cache_dir, f"synthetic-x{k}")
        with stopwatch() as t:
            marker, now = ensure_synthetic(k, synthetic[k], args.source)
        generated[k] = {"generate_seconds": t["seconds"] if now else None, "cached": not now,
                        "train_images_gz_mb": marker["bytes"]["train-images-idx3-ubyte.gz"] / 2**20,
                        "train_rows": marker["train_rows"]}

    ingested = ingest_scales(scales, args.cache_dir, synthetic, None if args.no_warmup else args.source)
    results: dict[int, dict[str, Any]] = {k: {**generated[k], **ingested[k], "loaders": {}} for k in scales}
    try:
        for k in scales:
            if "ingest_error" in results[k]:
                continue
            paths = sorted(glob.glob(os.path.join(results[k]["parquet_dir"], "train", "*.parquet")))
            for name in loaders:
                log.info("x%d: loader %s ...", k, name)
                try:
                    results[k]["loaders"][name] = run_in_child(LOADERS[name], paths, args.epochs,
                                                               torch_threads=args.torch_threads)
                except Exception as e:  # noqa: BLE001
                    log.warning("x%d: loader %s failed: %s", k, name, _error(e))
                    results[k]["loaders"][name] = {"error": _error(e)}
                log.info("x%d: loader %s: %s", k, name, results[k]["loaders"][name])
    finally:
        if not args.keep_parquet:
            for k in scales:
                shutil.rmtree(os.path.join(args.cache_dir, f"parquet-x{k}"), ignore_errors=True)
    report(results)
    return 0


def report(results: dict[int, dict[str, Any]]) -> None:
    """Print the ingest and loader tables, then the JSON line."""
    ingest_lines, loader_lines, payload = [], [], {"scales": {}}
    for k, r in results.items():
        stages = ", ".join(f"{n} {v:.1f}" for n, v in r.get("ingest_stages", {}).items())
        ingest_lines.append([f"x{k}", fmt_num(r["train_rows"]), fmt_num(r["train_images_gz_mb"]),
                             "cached" if r["cached"] else f"{r['generate_seconds']:.1f}",
                             r.get("ingest_error") or f"{r['ingest_seconds']:.1f}",
                             fmt_num(r["train_rows"] / r["ingest_seconds"]) if "ingest_seconds" in r else "-",
                             fmt_num(r["driver_peak_rss_mb"]), stages or "-"])
        for name, m in r["loaders"].items():
            if "error" in m:
                loader_lines.append([f"x{k}", name, "-", m["error"], "-", "-"])
                continue
            warm = fmt_num(m["warm_samples_per_s"]) if not m["warm_is_cold"] else "- (streams)"
            loader_lines.append([f"x{k}", name, "yes" if m["in_memory"] else "no (streams)",
                                 fmt_num(m["cold_samples_per_s"]), warm, fmt_num(m["peak_rss_mb"])])
            payload[f"{name}_cold_samples_per_s_x{k}"] = m["cold_samples_per_s"]
            payload[f"{name}_warm_samples_per_s_x{k}"] = None if m["warm_is_cold"] else m["warm_samples_per_s"]
        if "ingest_seconds" in r:
            payload[f"ingest_seconds_x{k}"] = r["ingest_seconds"]
        payload["scales"][str(k)] = {key: v for key, v in r.items() if key != "parquet_dir"}
    print()
    print(table(["scale", "train rows", "train gz MB", "generate s", "ingest s", "ingest rows/s",
                 "driver peak RSS MB", "ingest stages (s)"], ingest_lines))
    print()
    print(f"loader: rank 0 of 1, batch 256, over the ingested training shards; {os.cpu_count()} CPUs")
    print(table(["scale", "loader", "in memory", "cold samples/s", "warm samples/s", "peak RSS MB"],
                loader_lines or [["-", "-", "-", "-", "-", "-"]]))
    emit_json(payload)


if __name__ == "__main__":
    sys.exit(main())
