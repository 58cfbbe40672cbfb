"""The Databricks notebooks of ``examples/notebooks`` (Databricks source format), run cell by cell on local Spark and
the CPU, in order, as a user runs them: ingest into a "volume" (a temporary directory), train on it with
TorchDistributor, with the AI Runtime, and with your own loop.  Stand-ins sit at the import boundary only: the
notebook globals ``dbutils`` (its widgets give the paths and the CPU settings) and ``display``, and
``databricks.air`` (``tests/fake_air``, one process per accelerator); nothing of spark-mnist is patched.
``%pip`` cells are the notebook's own set-up, not Python, and are skipped."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, write_dataset

NOTEBOOKS = REPO / "examples" / "notebooks"
CELL = "# COMMAND ----------"
pytestmark = [pytest.mark.slow, pytest.mark.full]


class Widgets:
    """``dbutils.widgets``: each widget's value is the test's, where it sets one, else the notebook's default."""

    def __init__(self, values: dict[str, str]):
        self.values, self.defined = values, {}

    def text(self, name: str, default: str, label: str | None = None) -> None:
        self.defined[name] = default

    def dropdown(self, name: str, default: str, choices: list[str], label: str | None = None) -> None:
        assert default in choices
        self.defined[name] = default

    def get(self, name: str) -> str:
        return self.values.get(name, self.defined[name])


class Dbutils:
    def __init__(self, widgets: dict[str, str]):
        self.widgets = Widgets(widgets)


def cells(path: Path) -> list[str]:
    """The notebook's Python cells: ``# MAGIC`` cells (Markdown, ``%pip``) left out."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Databricks notebook source\n"), path
    found = []
    for cell in text.split(CELL)[0:]:
        lines = [line for line in cell.splitlines() if line.strip() and line != "# Databricks notebook source"]
        if lines and not all(line.startswith("# MAGIC") for line in lines):
            found.append(cell)
    return found


def run_notebook(name: str, widgets: dict[str, str], spark=None) -> dict:
    shown: list = []
    namespace = {"__name__": "__main__", "spark": spark, "dbutils": Dbutils(widgets), "display": shown.append}
    for cell in cells(NOTEBOOKS / name):
        exec(compile(cell, str(NOTEBOOKS / name), "exec"), namespace)  # noqa: S102 - the notebook is ours
    namespace["_displayed"] = shown
    return namespace


@pytest.fixture(scope="module")
def volume(spark, tmp_path_factory) -> Path:
    """A "volume" with raw MNIST-shaped files, ingested by the first notebook."""
    root = tmp_path_factory.mktemp("volume")
    write_dataset(root / "raw" / "mnist", train_rows=640, test_rows=130, dataset="mnist")
    namespace = run_notebook("01_ingest_to_volume.py", {"volume": str(root)}, spark)
    assert {s: i.rows for s, i in namespace["manifest"].splits.items()} == {"train": 640, "test": 130}
    assert namespace["_displayed"]
    return root


CPU = {"use_gpu": "false", "epochs": "1"}


def test_every_notebook_is_in_databricks_source_format():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.py"))
    assert names == ["01_ingest_to_volume.py", "02_train_classic_gpu_cluster.py", "03_train_serverless_gpu.py",
                     "04_own_training_loop.py"]
    for name in names:
        assert cells(NOTEBOOKS / name)


def test_classic_gpu_cluster_notebook_trains_with_torch_distributor(spark, volume):
    namespace = run_notebook("02_train_classic_gpu_cluster.py",
                             {"volume": str(volume), "local_mode": "true", "num_processes": "1", **CPU}, spark)
    metrics = namespace["metrics"]
    assert metrics["launcher"] == "torch-distributor" and metrics["world_size"] == 1
    assert (volume / "runs" / "mnist" / "model.pt").is_file()


def test_serverless_gpu_notebook_trains_through_databricks_air(volume, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "databricks.air", REPO / "tests" / "fake_air" / "databricks" / "air" / "__init__.py")
    fake_air = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake_air)
    monkeypatch.setitem(sys.modules, "databricks.air", fake_air)
    monkeypatch.setenv("TORCHELASTIC_SIGNALS_TO_HANDLE", "")  # torch's elastic agent sets it: put back after
    monkeypatch.delenv("TORCHELASTIC_SIGNALS_TO_HANDLE")
    namespace = run_notebook("03_train_serverless_gpu.py", {"volume": str(volume), "remote_gpu": "true", **CPU})
    assert namespace["metrics"]["launcher"] == "ai-runtime" and fake_air.CALLS
    assert (volume / "runs" / "mnist-serverless" / "model.pt").is_file()


def test_own_loop_notebook_trains_with_the_loader(volume, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # set by the optimizer's first step
    namespace = run_notebook("04_own_training_loop.py", {"volume": str(volume), "epochs": "2"})
    assert namespace["state"]["epoch"] == 1 and namespace["seen"] == 130
