"""``make gpu-bundle`` then ``scripts/gpu_check.py --bundle DIR --allow-cpu`` as on an offline GPU machine.

The bundle is made by the script ``make gpu-bundle`` runs (scripts/gpu_bundle.py), with wheels for this machine's
Python and a tiny, learnable dataset ingested here (``--data``: no Spark in the script).  The check then runs in a
virtual environment that holds only what a lent GPU machine has (torch, numpy, pyarrow, pandas, pyyaml, tqdm,
requests, at lane spark40's pins; no pyspark, no pydantic), without network (``unshare -n``, loopback up for the
ranks' rendezvous): everything else must come from the bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.one_lane]  # the check's environment takes lane spark40's pins in any lane

UV = REPO / ".venv" / ".uv" / "bin" / "uv"
LOCK = REPO / "requirements" / "lanes" / "spark40.txt"
# What a lent GPU machine's Python has (pytest too: the GPU-marked tests, which --allow-cpu skips).
GPU_MACHINE_PACKAGES = ("torch", "numpy", "pyarrow", "pandas", "pyyaml", "tqdm", "requests")
OFFLINE = "ip link set lo up && exec \"$0\" \"$@\""


def no_network_reason() -> str | None:
    """Why this machine cannot run a command without network (``unshare -n``), or ``None``."""
    for tool in ("unshare", "ip", "sh"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (util-linux, iproute2)"
    if os.geteuid() != 0:
        return "unshare -n needs root here"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n is refused here: {probe.stderr.strip()[:200]}"
    return None


def write_learnable_source(directory: Path, train_rows: int, test_rows: int) -> None:
    """The four gz IDX files of a Fashion-MNIST-shaped dataset whose class is a bright block's place in the image
    (over dim noise), so that one short epoch learns it: random labels would leave test accuracy at chance."""
    from spark_mnist.datasets import get_dataset
    from spark_mnist.formats.idx import write_idx

    spec = get_dataset("fashion-mnist")
    directory.mkdir(parents=True)
    for split, rows, seed in (("train", train_rows, 0), ("test", test_rows, 1)):
        rng = np.random.default_rng(seed)
        labels = (np.arange(rows) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 64, size=(rows, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            row, column = divmod(int(label), 5)
            images[i, 4 + 12 * row:12 + 12 * row, 1 + 5 * column:5 + 5 * column] = 255
        write_idx(directory / spec.file(split, "images").name, images)
        write_idx(directory / spec.file(split, "labels").name, labels)


@pytest.fixture(scope="session")
def gpu_machine_python(tmp_path_factory) -> Path:
    """A Python with only a GPU machine's packages (the CPU wheel of torch; pip, as there), no system site."""
    if not UV.exists():
        pytest.skip(f"{UV} is missing: make venv installs it")
    venv = tmp_path_factory.mktemp("gpu-machine") / "venv"
    python = venv / "bin" / "python"
    uv_args = subprocess.run([sys.executable, str(REPO / "requirements" / "uv_args.py")], capture_output=True,
                             text=True, check=True).stdout.split()
    subprocess.run([str(UV), "venv", "--quiet", "--seed", "--python", sys.executable, str(venv)], check=True)
    subprocess.run([str(UV), "pip", "install", "--quiet", "--python", str(python), *uv_args, "-c", str(LOCK),
                    *GPU_MACHINE_PACKAGES], check=True)
    return python


def clean_env() -> dict[str, str]:
    """This process's environment without what would reach its packages: no PYTHONPATH, Spark or pip settings.
    Bytecode is written (as the Makefile has it), so that each child and rank does not compile torch again."""
    drop = ("PYTHONPATH", "PYTHONHOME", "SPARK_HOME", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "SPARK_REMOTE",
            "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PIP_")}
    return {**env, "CUDA_VISIBLE_DEVICES": ""}


def test_bundle_runs_offline_without_spark_or_pydantic(tmp_path, spark, gpu_machine_python):
    reason = no_network_reason()
    if reason is not None:
        pytest.skip(f"cannot cut the network off: {reason}")
    import spark_mnist

    source, data = tmp_path / "source", tmp_path / "ingested"
    write_learnable_source(source, train_rows=640, test_rows=130)
    spark_mnist.ingest(spark, str(source), str(data), dataset="fashion-mnist", num_shards=2)

    bundle = tmp_path / "bundle"
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    made = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_bundle.py"), "--out", str(bundle),
                           "--python-version", here, "--data", str(data)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    info = json.loads((bundle / "BUNDLE.json").read_text())
    assert info["python_version"] == here and info["total_bytes"] < 60 * 2**20
    wheels = {name.split("-")[0].lower() for name in info["wheels"]}
    assert {"spark_mnist", "pydantic", "pydantic_core", "annotated_types"} <= wheels
    assert not wheels & {"torch", "numpy", "pyarrow", "pandas", "pyspark"}, wheels
    assert sum(f["bytes"] for f in info["files"]) == info["total_bytes"]

    env = clean_env()
    # The environment itself has neither pyspark nor pydantic: only the bundle brings pydantic.
    probe = subprocess.run([str(gpu_machine_python), "-c", "import importlib.util as u, json; print(json.dumps("
                            "[bool(u.find_spec(m)) for m in ('pyspark', 'pydantic', 'torch', 'pyarrow')]))"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    assert json.loads(probe.stdout) == [False, False, True, True]

    check = subprocess.run(["unshare", "-n", "sh", "-c", OFFLINE, str(gpu_machine_python),
                            str(REPO / "scripts" / "gpu_check.py"), "--bundle", str(bundle), "--allow-cpu",
                            "--epochs", "1", "--batch-size", "64", "--work", str(tmp_path / "work")],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert check.returncode == 0, check.stdout[-4000:] + check.stderr[-4000:]
    lines = [json.loads(line) for line in check.stdout.splitlines() if line.startswith("{")]
    runs = [line for line in lines if "run" in line and "test_accuracy" in line]
    summary = lines[-1]
    assert summary.get("summary") is True, check.stdout[-4000:]
    assert [run["ranks"] for run in runs] == sorted((run["ranks"] for run in runs), reverse=True)
    assert {run["ranks"] for run in runs} == {2, 1}
    assert len(runs) == (4 if summary["resident_setting"] else 2)
    for run in runs:
        assert run["test_accuracy"] > 0.1, run
        assert run["device"] == "cpu" and run["gpus"] == 0 and run["peak_gpu_memory_mib"] is None
        assert run["samples_per_s_per_gpu"] > 0 and 0 <= run["data_wait_fraction"] <= 1
        assert run["seconds"] >= run["train_seconds"] > 0
    assert summary["runs"][:len(runs)] == runs and summary["test_accuracy"] == runs[0]["test_accuracy"]
    assert summary["gpu_tests"].startswith("skipped")
    site = summary["bundle"]["site"]
    assert summary["imports"]["pydantic"].startswith(site + os.sep)
    assert summary["imports"]["pyspark"] is False
    installed = summary["bundle"]["installed"]
    assert any(n.startswith("pydantic-") for n in installed) and any(n.startswith("pydantic_core-") for n in installed)
