"""``make gpu-check``: the GPU paths on a machine with an NVIDIA GPU, in under 5 minutes on one GPU.

1. the GPU-marked tests (``pytest -m gpu``: pinned batches, non_blocking copies, bf16, nccl);
2. Fashion-MNIST ingested once (Spark local, CPU), then the main job with ``use_gpu: true`` under
   ``--launcher torchrun`` on one GPU and on all of them (nccl);
3. the same through ``databricks.air``'s own local mode (``--launcher ai-runtime``) on Databricks
   (``DATABRICKS_RUNTIME_VERSION`` set) where databricks-sdk-air is installed and accepts the machine (it knows
   A10, H100 and B300 nodes); otherwise the line says why it was skipped.

It ends with one JSON line: test accuracy, seconds, samples/s per GPU and data-wait fraction of each run, the
all-GPU torchrun run's figures first.  Where torch sees no CUDA device (no GPU, or torch's CPU build) it fails at
once with one line saying so (exit 2).  Every child command runs under ``--step-timeout`` seconds: one that hangs is
killed and the check fails with one line naming it.

    python scripts/gpu_check.py [--data /usr/share/datasets/fashion-mnist] [--work /tmp/spark-mnist-gpu-check]
                                [--epochs 2] [--step-timeout 600]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXIT_NO_GPU = 2
STEP_TIMEOUT_S = 600  # the default limit of one child command (the tests, an ingest, a training run), seconds


def fail(message: str, code: int = 1) -> None:
    print(f"gpu-check: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def gpu_count() -> int:
    """CUDA devices torch sees; exits 2 with one line where there are none (what training needs is torch's view,
    not a driver tool's)."""
    try:
        import torch
    except ImportError:
        fail("torch is not installed: pip install 'spark-mnist[torch]' with a CUDA build of torch", EXIT_NO_GPU)
    if not torch.cuda.is_available():
        fail(f"torch {torch.__version__} sees no CUDA device (no GPU, CPU build or driver?): run make gpu-check on "
             f"a machine with an NVIDIA GPU and a CUDA build of torch (the CI lanes pin the CPU wheel)", EXIT_NO_GPU)
    return torch.cuda.device_count()


def run_child(command: list[str], what: str, timeout_s: float, capture: bool) -> subprocess.CompletedProcess:
    """``command`` in a child under ``timeout_s`` seconds; a child that runs past it is killed and the check fails
    with one line naming ``what``."""
    try:
        return subprocess.run(command, capture_output=capture, text=True, cwd=REPO, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        for stream, tail in ((sys.stdout, e.stdout), (sys.stderr, e.stderr)):
            if tail:
                stream.write((tail.decode(errors="replace") if isinstance(tail, bytes) else tail)[-4000:])
        fail(f"{what} ran past {timeout_s:g} s and was stopped (--step-timeout)")


def pytest_command(timeout_s: float) -> list[str]:
    """The GPU-marked tests' command: pytest-timeout's ``--timeout`` where the plugin is installed, else the
    project's ``addopts`` (which name it) replaced, so pytest does not refuse an unknown option."""
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    if has_module("pytest_timeout"):
        return [*command, f"--timeout={int(timeout_s)}", "tests/test_gpu.py", "tests/test_gpu_paths.py"]
    return [*command, "-o", "addopts=-ra --strict-markers", "tests/test_gpu.py", "tests/test_gpu_paths.py"]


def has_module(name: str) -> bool:
    """Whether ``name`` can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # its parent package is missing
        return False


def on_databricks() -> bool:
    """Whether this is a Databricks runtime, the only place ``databricks.air``'s local mode runs."""
    return bool(os.environ.get("DATABRICKS_RUNTIME_VERSION"))


def cli(*args: str, check: bool = True, timeout_s: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``spark-mnist ARGS`` in a child under ``timeout_s`` seconds; its output is shown as it is captured."""
    command = [sys.executable, "-m", "spark_mnist.cli", *args]
    print("gpu-check: $ spark-mnist " + " ".join(args), flush=True)
    result = run_child(command, f"spark-mnist {args[0]}", timeout_s, capture=True)
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
    parser.add_argument("--step-timeout", type=float, default=STEP_TIMEOUT_S,
                        help=f"seconds each child command may run (default: {STEP_TIMEOUT_S})")
    args = parser.parse_args(argv)
    if args.step_timeout <= 0:
        parser.error(f"--step-timeout must be positive, got {args.step_timeout:g}")
    gpus = gpu_count()
    started = time.perf_counter()
    limit = args.step_timeout
    tests = run_child(pytest_command(limit), "the GPU-marked tests", limit, capture=False)
    if tests.returncode != 0:
        fail("the GPU-marked tests failed")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    data = work / "fashion-mnist"
    cli("ingest", "--source", args.data, "--output", str(data), "--config", str(REPO / "conf" / "local.yaml"),
        timeout_s=limit)
    common = ["--data", str(data), "--epochs", str(args.epochs), "--use-gpu", "--batch-size", "512",
              "--max-restarts", "0", "--config", str(REPO / "conf" / "local.yaml")]
    runs = []
    for ranks in sorted({gpus, 1}, reverse=True):
        run_dir = work / f"torchrun-{ranks}"
        t = time.perf_counter()
        cli("train", "--launcher", "torchrun", "--num-processes", str(ranks), "--run-dir", str(run_dir), *common,
            timeout_s=limit)
        runs.append(figures(f"torchrun x{ranks}", run_dir, ranks, time.perf_counter() - t))
    air = on_databricks() and has_module("databricks.air")
    if air:
        run_dir = work / "ai-runtime"
        t = time.perf_counter()
        result = cli("train", "--launcher", "ai-runtime", "--num-processes", str(gpus), "--run-dir", str(run_dir),
                     *common, check=False, timeout_s=limit)
        if result.returncode == 0:
            runs.append(figures(f"ai-runtime x{gpus}", run_dir, gpus, time.perf_counter() - t))
        else:
            last = (result.stderr.strip().splitlines() or ["?"])[-1]
            runs.append({"run": "ai-runtime", "skipped": f"databricks.air refused this machine: {last[:300]}"})
    elif not on_databricks():
        runs.append({"run": "ai-runtime", "skipped": "not on Databricks (DATABRICKS_RUNTIME_VERSION unset): "
                                                     "databricks.air's local mode runs on Databricks GPU compute"})
    else:
        runs.append({"run": "ai-runtime", "skipped": "databricks-sdk-air not installed (pip install "
                                                     "'spark-mnist[ai-runtime]')"})
    summary = {**{k: v for k, v in runs[0].items() if k != "run"}, "total_seconds": round(time.perf_counter() -
                                                                                          started, 1), "runs": runs}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
