"""``make gpu-check``: the GPU paths on a machine with an NVIDIA GPU, in under 5 minutes on one GPU.

1. the GPU-marked tests (``pytest -m gpu``: pinned batches, non_blocking copies, bf16, nccl);
2. Fashion-MNIST ingested once (Spark local, CPU), then the main job with ``use_gpu: true`` under
   ``--launcher torchrun`` on one GPU and on all of them (nccl); where spark_mnist/config.py has a setting for a
   device-resident loader, each of those runs with it on and off (else the output says it is not available);
3. the same through ``databricks.air``'s own local mode (``--launcher ai-runtime``) on Databricks
   (``DATABRICKS_RUNTIME_VERSION`` set) where databricks-sdk-air is installed and accepts the machine (it knows
   A10, H100 and B300 nodes); otherwise the line says why it was skipped.

It ends with one JSON line per run (test accuracy, seconds of wall and of training, samples/s per GPU, data-wait
fraction, peak GPU memory) and a summary JSON line (the all-GPU torchrun run's figures first, then every run).  Peak
GPU memory is the run's metrics.json figure where it carries one, else ``nvidia-smi``'s ``memory.used`` sampled
every half second while the run lasts (the whole GPU's, CUDA contexts included; ``peak_gpu_memory_source`` says
which).  Where torch sees no CUDA device (no GPU, or torch's CPU build) it fails at once with one line saying so
(exit 2).  Every child command runs under ``--step-timeout`` seconds: one that hangs is killed and the check fails
with one line naming it.

``--bundle DIR`` (a folder ``make gpu-bundle`` wrote, scripts/gpu_bundle.py): for a GPU machine with Python, torch,
numpy, pyarrow, pandas, pyyaml, tqdm, requests and pytest but no network, Java or pyspark.  The bundle's wheels are
installed from that folder alone (``pip install --no-index --no-deps --target``, into a temporary directory put first
on every child's ``PYTHONPATH``; a wheel whose distribution this Python already has at the same or a newer version is
left out), and its ingested dataset is trained on: no Spark, no ingest.  ``--allow-cpu``: where torch sees no CUDA
device, the same path on CPU (``use_gpu`` off, gloo, 2 ranks for "all"), without the GPU-marked tests.

    python scripts/gpu_check.py [--data /usr/share/datasets/fashion-mnist] [--work /tmp/spark-mnist-gpu-check]
                                [--epochs 2] [--batch-size 512] [--step-timeout 600]
    python3 scripts/gpu_check.py --bundle .gpu-bundle [--allow-cpu] [--epochs 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXIT_NO_GPU = 2
STEP_TIMEOUT_S = 600  # the default limit of one child command (the tests, an ingest, a training run), seconds
CPU_RANKS = 2  # --allow-cpu without a GPU: the "all" run's ranks
# The environment of every child command: this one, with the bundle's install directory first on PYTHONPATH.
CHILD_ENV: dict[str, str] = dict(os.environ)
# A train setting for a device-resident loader (the dataset held in GPU memory), by name or by a choice's value.
RESIDENT = re.compile(r"resident|on_device|device_(data|loader|cache|dataset)")
RESIDENT_CHOICE = re.compile(r"resident|device")
# Keys a run's metrics.json may carry its peak GPU memory under (bytes), at the top or in its last epoch.
PEAK_KEYS = ("peak_gpu_memory_bytes", "max_memory_allocated_bytes", "peak_memory_bytes", "max_memory_allocated")


def fail(message: str, code: int = 1) -> None:
    print(f"gpu-check: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def say(message: str) -> None:
    print(f"gpu-check: {message}", flush=True)


def gpu_count(allow_cpu: bool = False) -> int:
    """CUDA devices torch sees; exits 2 with one line where there are none (what training needs is torch's view,
    not a driver tool's), unless ``allow_cpu`` (then 0)."""
    try:
        import torch
    except ImportError:
        fail("torch is not installed: pip install 'spark-mnist[torch]' with a CUDA build of torch", EXIT_NO_GPU)
    if not torch.cuda.is_available():
        if allow_cpu:
            say(f"torch {torch.__version__} sees no CUDA device: running on CPU (--allow-cpu), without the "
                f"GPU-marked tests")
            return 0
        fail(f"torch {torch.__version__} sees no CUDA device (no GPU, CPU build or driver?): run make gpu-check on "
             f"a machine with an NVIDIA GPU and a CUDA build of torch (the CI lanes pin the CPU wheel); "
             f"--allow-cpu runs the same path on CPU", EXIT_NO_GPU)
    return torch.cuda.device_count()


def run_child(command: list[str], what: str, timeout_s: float, capture: bool) -> subprocess.CompletedProcess:
    """``command`` in a child under ``timeout_s`` seconds; a child that runs past it is killed and the check fails
    with one line naming ``what``."""
    try:
        return subprocess.run(command, capture_output=capture, text=True, cwd=REPO, timeout=timeout_s, env=CHILD_ENV)
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
    return [*command, "-p", "spark_mnist.testing", "-o", "addopts=-ra --strict-markers", "tests/test_gpu.py",
            "tests/test_gpu_paths.py"]


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


# --- the bundle ---------------------------------------------------------------------------------------------------

def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def version_key(version: str) -> tuple:
    """A version's release numbers, for "same or newer" (enough for the wheels a bundle holds)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:4])


def installed_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def pip_env() -> dict[str, str]:
    """pip without this machine's configuration: no config files, no index, no find-links."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def unpack_wheels(wheels: list[Path], site: Path) -> None:
    """What ``pip install --target`` does for these wheels where this Python has no pip: each archive unpacked, its
    ``*.data/purelib`` and ``platlib`` merged in (scripts and headers are not needed)."""
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    for data in site.glob("*.data"):
        for part in ("purelib", "platlib"):
            if (data / part).is_dir():
                shutil.copytree(data / part, site, dirs_exist_ok=True)
        shutil.rmtree(data)


def install_bundle(bundle: Path, site: Path, timeout_s: float) -> dict:
    """The bundle's wheels installed into ``site`` from the bundle alone, then ``site`` put first on this process's
    path and every child's ``PYTHONPATH``.  Returns what was installed and what was left to this Python."""
    info_file = bundle / "BUNDLE.json"
    if not info_file.is_file():
        fail(f"{bundle} is not a bundle (no BUNDLE.json): run make gpu-bundle on a machine with the package index")
    info = json.loads(info_file.read_text())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if info.get("python_version") and info["python_version"] != here:
        fail(f"{bundle}'s wheels are for Python {info['python_version']}, this is Python {here}: make gpu-bundle "
             f"GPU_PYTHON={here}")
    wheels = sorted((bundle / "wheels").glob("*.whl"))
    if not wheels:
        fail(f"{bundle}/wheels holds no wheels: run make gpu-bundle again")
    chosen, kept = [], {}
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        have = installed_version(name)
        if canonical(name) != "spark-mnist" and have and version_key(have) >= version_key(version):
            kept[canonical(name)] = have  # this Python's own copy stands (e.g. typing-extensions with torch)
        else:
            chosen.append(wheel)
    site.mkdir(parents=True, exist_ok=True)
    if has_module("pip"):
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                   "--target", str(site), *map(str, chosen)]
        say("$ " + " ".join(command[2:]))
        try:
            result = subprocess.run(command, env=pip_env(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            fail(f"installing the bundle's wheels ran past {timeout_s:g} s")
        if result.returncode != 0:
            fail(f"installing the bundle's wheels from {bundle}/wheels failed (exit {result.returncode})")
    else:
        say(f"no pip here: unpacking {len(chosen)} wheels into {site}")
        unpack_wheels(chosen, site)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    CHILD_ENV["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {"installed": [w.name for w in chosen], "kept": kept, "dataset": info.get("dataset")}


def bundle_data(bundle: Path) -> Path:
    """The ingested dataset of the bundle: BUNDLE.json's ``data``, else the one folder under ``data/``."""
    info = json.loads((bundle / "BUNDLE.json").read_text())
    data = bundle / info["data"] if info.get("data") else None
    if data is None:
        found = [p for p in sorted((bundle / "data").glob("*")) if (p / "_manifest.json").is_file()]
        data = found[0] if found else None
    if data is None or not (data / "_manifest.json").is_file():
        fail(f"{bundle} holds no ingested dataset (data/NAME/_manifest.json): run make gpu-bundle again")
    return data


def preflight(timeout_s: float) -> dict:
    """``import spark_mnist.cli`` in a child as the runs will: where pydantic and the package come from, and
    whether pyspark is there at all (it need not be)."""
    code = ("import importlib.util, json, pydantic, spark_mnist, spark_mnist.cli; "
            "print(json.dumps({'pydantic': pydantic.__file__, 'spark_mnist': spark_mnist.__file__, "
            "'spark_mnist_version': spark_mnist.__version__, "
            "'pyspark': bool(importlib.util.find_spec('pyspark'))}))")
    result = run_child([sys.executable, "-c", code], "importing spark_mnist.cli", timeout_s, capture=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        fail("import spark_mnist.cli failed with the bundle installed (above)")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- runs ---------------------------------------------------------------------------------------------------------

def resident_modes() -> tuple[list[tuple[str, list[str]]], str | None]:
    """``[(label, options)]`` for each run of a launch: the device-resident loader on and off where
    spark_mnist/config.py has a setting for one (a switch, or a choice whose value names it), else one run as the
    settings stand; and that setting's name (``None``: not available)."""
    try:
        from spark_mnist.config import TrainSettings, options
    except ImportError as e:
        say(f"the settings do not import here ({e}): runs as configured")
        return [("", [])], None
    for option in options("train"):
        if option.type is bool and RESIDENT.search(option.name):
            return [(f"{option.name}=on", [option.flag]), (f"{option.name}=off", ["--no-" + option.flag[2:]])], \
                option.name
        if option.choices and RESIDENT.search(option.name):  # e.g. resident_data: auto, on, off
            on = next((c for c in option.choices if str(c) in ("on", "true", "yes", "always", "device")), None)
            off = next((c for c in option.choices if str(c) in ("off", "false", "no", "never", "host")), None)
            if on is not None and off is not None:
                return [(f"{option.name}={value}", [option.flag, str(value)]) for value in (on, off)], option.name
        for choice in option.choices or ():
            if RESIDENT_CHOICE.search(str(choice)):
                default = TrainSettings.__fields__[option.name].default
                other = default if default != choice else next(c for c in option.choices if c != choice)
                return [(f"{option.name}={choice}", [option.flag, str(choice)]),
                        (f"{option.name}={other}", [option.flag, str(other)])], option.name
    return [("", [])], None


class MemorySampler:
    """``nvidia-smi --query-gpu=memory.used`` every ``period_s`` while a run lasts: the highest figure of any GPU,
    MiB (the whole GPU's use, CUDA contexts and other processes included)."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.period_s, self.peak_mib, self.error = period_s, None, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                used = [int(v) for v in re.findall(r"\d+", out)]
                if used:
                    self.peak_mib = max(used + ([self.peak_mib] if self.peak_mib is not None else []))
            except (OSError, subprocess.SubprocessError) as e:
                self.error = str(e)
                return
            self._stop.wait(self.period_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def peak_from_metrics(metrics: dict) -> int | None:
    for place in (metrics, (metrics.get("history") or [{}])[-1]):
        for key in PEAK_KEYS:
            if isinstance(place.get(key), (int, float)):
                return int(place[key])
    return None


def figures(name: str, run_dir: Path, ranks: int, seconds: float, sampled_mib: int | None, gpus: int) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last = metrics["history"][-1]
    peak = peak_from_metrics(metrics)
    if peak is not None:
        memory, source = round(peak / 2**20, 1), "metrics.json (the ranks' torch.cuda.max_memory_allocated)"
    elif gpus and sampled_mib is not None:
        memory, source = sampled_mib, "nvidia-smi memory.used, sampled every 0.5 s (whole GPU, contexts included)"
    else:
        memory = None
        source = "no GPU" if not gpus else "not measured: metrics.json has none and nvidia-smi did not answer"
    return {"run": name, "gpus": ranks if gpus else 0, "ranks": ranks,
            "test_accuracy": round(metrics["test_accuracy"], 4), "seconds": round(seconds, 1),
            "train_seconds": metrics["train_seconds"], "wall_seconds": metrics.get("wall_seconds"),
            "samples_per_s_per_gpu": round(last["samples_per_s"] / ranks, 1),
            "data_wait_fraction": round(last["data_wait_fraction"], 4), "peak_gpu_memory_mib": memory,
            "peak_gpu_memory_source": source, "device": metrics["device"],
            **{key: metrics[key] for key in ("resident_data",) if key in metrics}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the GPU paths of spark-mnist, ending with JSON lines")
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="the four gz IDX files")
    parser.add_argument("--work", help="dataset and run directories (default: /tmp/spark-mnist-gpu-check; with "
                                       "--bundle, a new temporary directory, removed at the end)")
    parser.add_argument("--bundle", help="a folder make gpu-bundle wrote: install from it alone and train on its "
                                         "dataset (no network, Java or Spark)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without a CUDA device, the same runs on CPU (gloo, 2 ranks), without the GPU tests")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512, help="samples per step per rank (default: 512)")
    parser.add_argument("--step-timeout", type=float, default=STEP_TIMEOUT_S,
                        help=f"seconds each child command may run (default: {STEP_TIMEOUT_S})")
    args = parser.parse_args(argv)
    if args.step_timeout <= 0:
        parser.error(f"--step-timeout must be positive, got {args.step_timeout:g}")
    gpus = gpu_count(args.allow_cpu)
    started = time.perf_counter()
    limit = args.step_timeout
    if args.work:
        work = Path(args.work).resolve()
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    elif args.bundle:
        work = Path(tempfile.mkdtemp(prefix="spark-mnist-gpu-check-"))
        atexit.register(shutil.rmtree, work, True)
    else:
        work = Path("/tmp/spark-mnist-gpu-check")
        shutil.rmtree(work, ignore_errors=True)
    summary: dict = {"mode": "bundle" if args.bundle else "environment", "python": sys.version.split()[0],
                     "gpus": gpus}
    if args.bundle:
        bundle = Path(args.bundle).resolve()
        summary["bundle"] = {**install_bundle(bundle, work / "site", limit), "site": str(work / "site")}
        sys.path.insert(0, str(REPO))  # the children run in the source tree, which comes first on their path too
        summary["imports"] = preflight(limit)
        data = bundle_data(bundle)
    if gpus and has_module("pytest"):
        tests = run_child(pytest_command(limit), "the GPU-marked tests", limit, capture=False)
        if tests.returncode != 0:
            fail("the GPU-marked tests failed")
        summary["gpu_tests"] = "passed"
    else:
        summary["gpu_tests"] = "skipped: " + ("no CUDA device (--allow-cpu)" if not gpus else "pytest not installed")
        say(f"GPU-marked tests {summary['gpu_tests']}")
    if not args.bundle:
        data = work / "fashion-mnist"
        cli("ingest", "--source", args.data, "--output", str(data), "--config", str(REPO / "conf" / "local.yaml"),
            timeout_s=limit)
    modes, resident = resident_modes()
    summary["resident_setting"] = resident
    if resident is None:
        say("resident mode not available: spark_mnist/config.py has no setting for a device-resident loader; "
            "each launch runs once, as configured")
    common = ["--data", str(data), "--epochs", str(args.epochs), "--use-gpu" if gpus else "--no-use-gpu",
              "--batch-size", str(args.batch_size), "--max-restarts", "0",
              "--config", str(REPO / "conf" / "local.yaml")]
    sample = bool(gpus) and shutil.which("nvidia-smi") is not None
    runs = []
    for ranks in sorted({gpus or CPU_RANKS, 1}, reverse=True):
        for label, extra in modes:
            name = f"torchrun x{ranks}" + (f" {label}" if label else "")
            run_dir = work / ("torchrun-" + str(ranks) + (f"-{re.sub(r'[^a-z0-9]+', '-', label)}" if label else ""))
            t = time.perf_counter()
            sampler = MemorySampler()
            with sampler if sample else contextlib.nullcontext():
                cli("train", "--launcher", "torchrun", "--num-processes", str(ranks), "--run-dir", str(run_dir),
                    *common, *extra, timeout_s=limit)
            run = figures(name, run_dir, ranks, time.perf_counter() - t, sampler.peak_mib, gpus)
            runs.append(run)
            print(json.dumps(run), flush=True)
    air = on_databricks() and has_module("databricks.air")
    if air and gpus:
        run_dir = work / "ai-runtime"
        t = time.perf_counter()
        result = cli("train", "--launcher", "ai-runtime", "--num-processes", str(gpus), "--run-dir", str(run_dir),
                     *common, check=False, timeout_s=limit)
        if result.returncode == 0:
            runs.append(figures(f"ai-runtime x{gpus}", run_dir, gpus, time.perf_counter() - t, None, gpus))
        else:
            last = (result.stderr.strip().splitlines() or ["?"])[-1]
            runs.append({"run": "ai-runtime", "skipped": f"databricks.air refused this machine: {last[:300]}"})
    elif not on_databricks():
        runs.append({"run": "ai-runtime", "skipped": "not on Databricks (DATABRICKS_RUNTIME_VERSION unset): "
                                                     "databricks.air's local mode runs on Databricks GPU compute"})
    elif not gpus:
        runs.append({"run": "ai-runtime", "skipped": "no CUDA device (--allow-cpu)"})
    else:
        runs.append({"run": "ai-runtime", "skipped": "databricks-sdk-air not installed (pip install "
                                                     "'spark-mnist[ai-runtime]')"})
    if "skipped" in runs[-1]:
        print(json.dumps(runs[-1]), flush=True)
    summary = {"summary": True, **{k: v for k, v in runs[0].items() if k != "run"}, **summary,
               "total_seconds": round(time.perf_counter() - started, 1), "runs": runs}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
