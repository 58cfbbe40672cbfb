"""``make gpu-check``: the GPU paths on a machine with an NVIDIA GPU, in under 5 minutes on one GPU.

1. the GPU-marked tests (``pytest -m gpu``: pinned batches, non_blocking copies, bf16, nccl);
2. Fashion-MNIST ingested once (Spark local, CPU), then the main job with ``use_gpu: true`` under
   ``--launcher torchrun`` on one GPU and on all of them (nccl);
3. the same through ``databricks.air``'s own local mode (``--launcher ai-runtime``) where databricks-sdk-air is
   installed and accepts the machine (it knows A10, H100 and B300 nodes); otherwise the line says why it was
   skipped.

It ends with one JSON line: test accuracy, seconds, samples/s per GPU and data-wait fraction of each run, the
all-GPU torchrun run's figures first.  On a machine without a GPU (or with torch's CPU build) it fails at once with
one line saying so (exit 2).

    python scripts/gpu_check.py [--data /usr/share/datasets/fashion-mnist] [--work /tmp/spark-mnist-gpu-check]
                                [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXIT_NO_GPU = 2


def fail(message: str, code: int = 1) -> None:
    print(f"gpu-check: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def gpu_count() -> int:
    """CUDA devices torch sees; exits 2 with one line where there are none."""
    if shutil.which("nvidia-smi") is None:
        fail("no NVIDIA GPU on this machine (nvidia-smi not found): run make gpu-check on a machine with one",
             EXIT_NO_GPU)
    try:
        import torch
    except ImportError:
        fail("torch is not installed: pip install 'spark-mnist[torch]' with a CUDA build of torch", EXIT_NO_GPU)
    if not torch.cuda.is_available():
        fail(f"torch {torch.__version__} sees no CUDA device (CPU build? driver?): install a CUDA build of torch "
             f"(the CI lanes pin the CPU wheel)", EXIT_NO_GPU)
    return torch.cuda.device_count()


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``spark-mnist ARGS`` in a child; its output is shown as it is captured."""
    command = [sys.executable, "-m", "spark_mnist.cli", *args]
    print("gpu-check: $ spark-mnist " + " ".join(args), flush=True)
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    sys.stdout.write(result.stdout[-4000:])
    sys.stderr.write(result.stderr[-4000:])
    if check and result.returncode != 0:
        fail(f"spark-mnist {args[0]} failed with exit code {result.returncode}")
    return result


def figures(name: str, run_dir: Path, gpus: int, seconds: float) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last = metrics["history"][-1]
    return {"run": name, "gpus": gpus, "test_accuracy": round(metrics["test_accuracy"], 4),
            "seconds": round(seconds, 1), "train_seconds": metrics["train_seconds"],
            "samples_per_s_per_gpu": round(last["samples_per_s"] / gpus, 1),
            "data_wait_fraction": round(last["data_wait_fraction"], 4), "device": metrics["device"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the GPU paths of spark-mnist, ending with one JSON line")
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="the four gz IDX files")
    parser.add_argument("--work", default="/tmp/spark-mnist-gpu-check", help="dataset and run directories")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    gpus = gpu_count()
    started = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "tests/test_gpu.py"], cwd=REPO)
    if tests.returncode != 0:
        fail("the GPU-marked tests failed")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    data = work / "fashion-mnist"
    cli("ingest", "--source", args.data, "--output", str(data), "--config", str(REPO / "conf" / "local.yaml"))
    common = ["--data", str(data), "--epochs", str(args.epochs), "--use-gpu", "--batch-size", "512",
              "--max-restarts", "0", "--config", str(REPO / "conf" / "local.yaml")]
    runs = []
    for ranks in sorted({gpus, 1}, reverse=True):
        run_dir = work / f"torchrun-{ranks}"
        t = time.perf_counter()
        cli("train", "--launcher", "torchrun", "--num-processes", str(ranks), "--run-dir", str(run_dir),
                     *common)
        runs.append(figures(f"torchrun x{ranks}", run_dir, ranks, time.perf_counter() - t))
    try:
        import databricks.air  # noqa: F401
        air = True
    except ImportError:
        air = False
    if air:
        run_dir = work / "ai-runtime"
        t = time.perf_counter()
        result = cli("train", "--launcher", "ai-runtime", "--num-processes", str(gpus), "--run-dir", str(run_dir),
                     *common, check=False)
        if result.returncode == 0:
            runs.append(figures(f"ai-runtime x{gpus}", run_dir, gpus, time.perf_counter() - t))
        else:
            last = (result.stderr.strip().splitlines() or ["?"])[-1]
            runs.append({"run": "ai-runtime", "skipped": f"databricks.air refused this machine: {last[:300]}"})
    else:
        runs.append({"run": "ai-runtime", "skipped": "databricks-sdk-air not installed (pip install "
                                                     "'spark-mnist[ai-runtime]')"})
    summary = {**{k: v for k, v in runs[0].items() if k != "run"}, "total_seconds": round(time.perf_counter() -
                                                                                          started, 1), "runs": runs}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
