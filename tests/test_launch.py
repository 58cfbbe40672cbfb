"""The launchers: torchrun without pyspark, restarts after a SIGKILLed rank, resume across launchers, ai-runtime
through a stand-in for ``databricks.air`` at the import boundary, and the exit-2 refusals before anything starts.
The torchrun run, the restarts, the resume across launchers (a stop mid-epoch, then a resume) and ai-runtime are
``full`` (one lane runs them).

The training runs are subprocesses of ``spark-mnist train`` (torch's elastic agent installs signal handlers, which
only a main thread may do), in an environment where ``pyspark`` and ``mlflow`` cannot be imported
(a ``sitecustomize`` on ``PYTHONPATH`` sets ``sys.modules[name] = None``, in the ranks too).
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spark_mnist.cli import main
from spark_mnist.config import ACCELERATOR_TYPES, load_settings
from spark_mnist.rank.checkpoint import CHECKPOINT_NAME
from spark_mnist.rank.train import MODEL_NAME
from tests.conftest import REPO

pytestmark = pytest.mark.slow

FAKE_AIR = REPO / "tests" / "fake_air"
TRAIN = ["--epochs", "2", "--batch-size", "32", "--num-processes", "2", "--seed", "1"]


def ingested(spark, root: Path, train_rows: int, test_rows: int, num_shards: int) -> Path:
    """``root/data``: a small synthetic Fashion-MNIST-shaped dataset, ingested (shared by the launcher tests)."""
    from spark_mnist.driver.ingest import ingest
    from tests.conftest import write_dataset

    write_dataset(root / "source", train_rows=train_rows, test_rows=test_rows)
    ingest(spark, str(root / "source"), str(root / "data"), num_shards=num_shards)
    return root / "data"


@pytest.fixture(scope="module")
def dataset(spark, tmp_path_factory):
    return ingested(spark, tmp_path_factory.mktemp("launch"), 640, 130, 3)


def blocked_env(tmp_path: Path, *modules: str, fake_air: bool = False) -> dict[str, str]:
    """The environment of a child whose ``import <module>`` fails for each of ``modules`` (ranks included)."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))
    path = [str(shim), *([str(FAKE_AIR)] if fake_air else []), str(REPO)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def train_command(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "spark_mnist.cli", "train", "--data", str(data), "--run-dir", str(run_dir),
            *TRAIN, *extra]


def run_train(tmp_path: Path, data: Path, run_dir: Path, *extra: str, fake_air: bool = False):
    result = subprocess.run(train_command(data, run_dir, *extra), capture_output=True, text=True, timeout=600,
                            cwd=tmp_path, env=blocked_env(tmp_path, "pyspark", "mlflow", fake_air=fake_air))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result


def same_model(a: Path, b: Path) -> bool:
    x, y = (torch.load(p / MODEL_NAME, weights_only=True) for p in (a, b))
    return x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-5) for k in x)


@pytest.fixture(scope="module")
def torchrun_run(dataset, tmp_path_factory):
    """An uninterrupted torchrun run, where pyspark is not importable."""
    tmp = tmp_path_factory.mktemp("torchrun")
    metrics, result = run_train(tmp, dataset, tmp / "run", "--launcher", "torchrun")
    return metrics, tmp / "run", result


@pytest.mark.full  # the lanes differ in pyspark, which torchrun runs without: the lane whose tests share this run
def test_torchrun_trains_without_pyspark(torchrun_run):
    metrics, run_dir, result = torchrun_run
    assert metrics["launcher"] == "torchrun" and metrics["converter"] == "none" and metrics["restarts"] == 0
    assert metrics["world_size"] == 2 and metrics["steps_per_epoch"] == (640 // 2) // 32
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [h["test_samples"] for h in history] == [130, 130]
    assert (run_dir / MODEL_NAME).exists() and (run_dir / CHECKPOINT_NAME).exists()
    assert "MLflow is not installed" in result.stdout


def _rank_pids(parent: int) -> list[int]:
    """The ranks elastic_launch spawned: children of ``parent`` started by multiprocessing's spawn."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return []
    ranks = []
    for pid in children:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            ranks.append(int(pid))
    return ranks


@pytest.mark.full
def test_a_sigkilled_rank_restarts_from_the_checkpoint_and_ends_with_the_same_model(dataset, torchrun_run,
                                                                                       tmp_path):
    _, full_dir, _ = torchrun_run
    run_dir = tmp_path / "killed"
    child = subprocess.Popen(train_command(dataset, run_dir, "--launcher", "torchrun", "--checkpoint-every-steps",
                                           "1", "--max-restarts", "1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                             env=blocked_env(tmp_path, "pyspark", "mlflow"))
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / CHECKPOINT_NAME).exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        ranks = _rank_pids(child.pid)
        assert ranks, "no rank process found to kill"
        os.kill(ranks[-1], signal.SIGKILL)
        out, err = child.communicate(timeout=600)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, out[-3000:] + err[-3000:]
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["restarts"] == 1
    assert "restart 1/1 from the last checkpoint" in err and ("Signal 9" in err or "SIGKILL" in err), err[-3000:]
    assert same_model(run_dir, full_dir)


@pytest.mark.full
def test_a_checkpoint_resumes_under_another_launcher(spark, dataset, torchrun_run, tmp_path):
    """torch-distributor stops mid-epoch 2 (max_steps); torchrun resumes: the uninterrupted run's model."""
    from spark_mnist.models import build_model
    from spark_mnist.pipeline import train

    full, full_dir, _ = torchrun_run
    run_dir = tmp_path / "across"
    settings = load_settings(None, {"train": {"data": str(dataset), "run_dir": str(run_dir), "epochs": 2,
                                              "batch_size": 32, "num_processes": 2, "seed": 1, "max_steps": 13,
                                              "converter": "none"}})
    stopped = train(spark, settings)
    assert stopped["launcher"] == "torch-distributor"
    state = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["loader"]
    assert (state["epoch"], state["step"], state["seed"], state["world_size"]) == (1, 3, 1, 2)
    assert state["dataset"].startswith(("generation:", "sha256:"))
    resumed, _ = run_train(tmp_path, dataset, run_dir, "--launcher", "torchrun", "--resume")
    assert resumed["test_accuracy"] == pytest.approx(full["test_accuracy"])
    assert same_model(run_dir, full_dir)
    assert set(resumed) == set(full), "the same metrics JSON under every launcher"
    torch.manual_seed(1)  # the run's seed: the model training started from
    untrained = build_model("simple-cnn", 10, (28, 28)).state_dict()
    trained = torch.load(full_dir / MODEL_NAME, weights_only=True)
    assert not all(torch.allclose(trained[k], untrained[k], atol=1e-3) for k in trained)  # the models were trained


@pytest.mark.full
def test_ai_runtime_through_databricks_air(dataset, torchrun_run, tmp_path):
    """--launcher ai-runtime with a stand-in databricks.air (CPU processes, torchrun's environment): the same
    per-rank function, metrics and model as torchrun."""
    full, full_dir, _ = torchrun_run
    metrics, _ = run_train(tmp_path, dataset, tmp_path / "run", "--launcher", "ai-runtime", "--remote-gpu",
                           "--accelerator-type", "GPU_8xH100", "--accelerator-count", "2", fake_air=True)
    assert metrics["launcher"] == "ai-runtime" and metrics["world_size"] == 2
    assert set(metrics) == set(full)
    assert same_model(tmp_path / "run", full_dir)


# --- refusals before anything starts --------------------------------------------------------------------------


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_ai_runtime_without_the_package_exits_2_naming_it(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "databricks.air", None)
    assert main(["train", "--data", str(dataset), "--run-dir", str(tmp_path / "run"), "--launcher",
                 "ai-runtime"]) == 2
    line = one_error_line(capsys)
    assert "launcher 'ai-runtime' needs databricks.air" in line and "spark-mnist[ai-runtime]" in line
    assert not (tmp_path / "run").exists()


@pytest.fixture
def stand_in_air(monkeypatch):
    """``databricks.air`` is the stand-in for the test, and the modules it was before afterwards."""
    def databricks_modules():
        return {m: sys.modules[m] for m in list(sys.modules) if m == "databricks" or m.startswith("databricks.")}

    before = databricks_modules()
    monkeypatch.syspath_prepend(str(FAKE_AIR))
    for name in before:
        del sys.modules[name]
    yield
    for name in databricks_modules():
        del sys.modules[name]
    sys.modules.update(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_ai_runtime_local_mode_without_a_gpu_exits_2(dataset, tmp_path, stand_in_air, capsys):
    assert main(["train", "--data", str(dataset), "--run-dir", str(tmp_path / "run"), "--launcher",
                 "ai-runtime"]) == 2
    line = one_error_line(capsys)
    assert "needs 2 GPU(s) on this machine and torch sees 0" in line and "--launcher torchrun" in line


def test_torch_distributor_without_pyspark_exits_2(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyspark.ml.torch.distributor", None)
    assert main(["train", "--data", str(dataset), "--run-dir", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys)
    assert "launcher 'torch-distributor' needs pyspark" in line and "--launcher torchrun" in line


def test_torchrun_with_petastorm_is_refused(dataset, tmp_path, capsys):
    assert main(["train", "--data", str(dataset), "--launcher", "torchrun", "--loader", "petastorm"]) == 2
    assert "needs --launcher torch-distributor" in one_error_line(capsys)


# --- the real databricks.air ----------------------------------------------------------------------------------


def test_our_call_binds_to_the_real_databricks_air_signature(monkeypatch):
    """Where databricks-sdk-air[distributed] is installed (lane spark40): our decorator arguments bind to the real
    ``databricks.air.launcher.distributed`` signature, and its accelerator types are ours."""
    monkeypatch.setenv("DATABRICKS_INTERNAL_BETA_WARNING_PRINTED", "1")  # the package sets it on import
    launcher = pytest.importorskip("databricks.air.launcher", reason="databricks-sdk-air[distributed] not installed")
    from databricks.air.compute import AcceleratorType

    from spark_mnist.launch import decorator_kwargs

    settings = load_settings(None, {"train": {"launcher": "ai-runtime", "remote_gpu": True,
                                              "accelerator_type": "GPU_8xH100", "accelerator_count": 8}})
    inspect.signature(launcher.distributed).bind(**decorator_kwargs(settings.train))
    assert tuple(a.value for a in AcceleratorType) == ACCELERATOR_TYPES
    fake = inspect.signature(_fake_distributed())
    assert fake == inspect.signature(launcher.distributed).replace(parameters=[
        p.replace(annotation=fake.parameters[p.name].annotation)
        for p in inspect.signature(launcher.distributed).parameters.values()]), "the stand-in keeps the signature"


def _fake_distributed():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fake_air", FAKE_AIR / "databricks" / "air" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.distributed
