"""MLflow tracking (spark_mnist.tracking): where runs go, what a run holds, and that tracking never fails training.

No Spark here: the metrics dict is the one ``train_worker`` returns, made up, and the model a small SimpleCNN's
``state_dict``.  The tests that log need MLflow (``mlflow-skinny``) and are skipped without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import types

import pytest
import torch

from spark_mnist import tracking
from spark_mnist.models import SimpleCNN

CLASSES = ["a", "b", "c"]
IMAGE_SHAPE = (8, 8)
EPOCHS = 3


@pytest.fixture(autouse=True)
def clean_tracking_env(monkeypatch):
    """No tracking variables from the caller's environment."""
    for name in (tracking.TRACKING_URI_ENV, "DATABRICKS_RUNTIME_VERSION", tracking.ALLOW_FILE_STORE_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def tracking_log():
    """The logger tracking writes its lines and warnings to."""
    return tracking.log


def fake_run(tmp_path):
    """(settings dict, manifest, metrics, model path) of a made-up 3-epoch run with a small saved SimpleCNN."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.manual_seed(0)
    model_path = run_dir / "model.pt"
    torch.save(SimpleCNN(len(CLASSES), IMAGE_SHAPE).state_dict(), model_path)
    history = [{"epoch": e, "train_loss": 1.0 / e, "test_loss": 1.1 / e, "test_accuracy": 0.5 + 0.1 * e,
                "test_samples": 30, "samples_per_s": 100.0 * e, "data_wait_fraction": 0.05,
                "epoch_seconds": 0.5} for e in range(1, EPOCHS + 1)]
    metrics = {"dataset": "fashion-mnist", "test_accuracy": history[-1]["test_accuracy"], "epochs": EPOCHS,
               "world_size": 2, "steps_per_epoch": 4, "batch_size": 8, "samples_per_epoch": 64,
               "train_seconds": 1.5, "wall_seconds": 3.25, "device": "cpu", "loader": "spark-mnist",
               "model_path": str(model_path), "history": history}
    settings = {"spark": {"master": "local[2]", "conf": {}}, "ingest": {"dataset": "fashion-mnist"},
                "train": {"run_dir": str(run_dir), "epochs": EPOCHS, "lr": 0.001, "data": None}}
    manifest = {"schema_version": 1, "dataset": "fashion-mnist", "classes": CLASSES,
                "image_shape": list(IMAGE_SHAPE), "splits": {"train": {"rows": 64}, "test": {"rows": 30}}}
    return settings, manifest, metrics, model_path


def manifest_digest(manifest) -> str:
    """The dataset input's documented digest: the first 16 hex digits of the sha256 of the canonical manifest JSON."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --- tracking_uri -------------------------------------------------------------------------------------------------


def test_tracking_uri_is_a_file_store_under_the_run_dir(tmp_path, monkeypatch):
    expected = (tmp_path / "run" / "mlruns").as_uri()
    assert tracking.tracking_uri(tmp_path / "run") == expected
    assert tracking.tracking_uri((tmp_path / "run").as_uri()) == expected
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri("run") == expected


def test_tracking_uri_on_databricks_is_the_workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "15.4")
    assert tracking.on_databricks()
    assert tracking.tracking_uri(tmp_path) == "databricks"


def test_explicit_tracking_uri_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "15.4")
    monkeypatch.setenv(tracking.TRACKING_URI_ENV, "http://mlflow.example:5000")
    assert tracking.tracking_uri(tmp_path) == "http://mlflow.example:5000"


def test_databricks_experiment_names_are_workspace_paths(monkeypatch):
    me = types.SimpleNamespace(user_name="someone@example.com")
    workspace = types.SimpleNamespace(current_user=types.SimpleNamespace(me=lambda: me))
    monkeypatch.setitem(sys.modules, "databricks.sdk", types.SimpleNamespace(WorkspaceClient=lambda: workspace))
    assert tracking._experiment_name("spark-mnist", "databricks") == "/Users/someone@example.com/spark-mnist"
    assert tracking._experiment_name("/Shared/x", "databricks") == "/Shared/x"
    assert tracking._experiment_name("spark-mnist", "file:///tmp/mlruns") == "spark-mnist"
    monkeypatch.setitem(sys.modules, "databricks.sdk", None)  # no workspace user to be found
    assert tracking._experiment_name("spark-mnist", "databricks://profile") == "/Shared/spark-mnist"


def test_flatten_params():
    params = tracking.flatten_params({"train": {"epochs": 4, "data": None, "shape": [28, 28]},
                                      "spark": {"conf": {}, "x": {"spark.a:b": "v"}}, "long": "y" * 50},
                                     max_value_length=10)
    assert params == {"train.epochs": "4", "train.data": "None", "train.shape": "[28, 28]", "spark.conf": "{}",
                      "spark.x.spark.a_b": "v", "long": "yyyyyyy..."}


# --- without MLflow -----------------------------------------------------------------------------------------------


def test_without_mlflow_training_goes_on_and_says_so_once(tmp_path, monkeypatch, caplog, tracking_log):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    settings, manifest, metrics, model_path = fake_run(tmp_path)
    with caplog.at_level(logging.DEBUG, logger=tracking_log.name):
        run_id = tracking.log_training_run(settings, manifest, metrics, run_dir=tmp_path / "run")
    assert run_id is None
    assert [r.getMessage() for r in caplog.records if r.name == tracking_log.name] == [
        "MLflow is not installed; tracking is off (pip install 'spark-mnist[mlflow]')"]
    assert not (tmp_path / "run" / "mlruns").exists()


# --- with MLflow --------------------------------------------------------------------------------------------------


def test_logs_params_epoch_metrics_manifest_and_model(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking._tracking_service import utils as service_utils

    settings, manifest, metrics, model_path = fake_run(tmp_path)
    previous_uri = service_utils._tracking_uri
    run_id = tracking.log_training_run(settings, manifest, metrics, run_dir=tmp_path / "run")
    assert run_id is not None
    # Nothing global changed: MLflow's URI and the variables are as before (the conftest guard checks the latter).
    assert service_utils._tracking_uri == previous_uri
    assert tracking.TRACKING_URI_ENV not in os.environ and tracking.ALLOW_FILE_STORE_ENV not in os.environ

    uri = (tmp_path / "run" / "mlruns").as_uri()
    assert (tmp_path / "run" / "mlruns").is_dir()
    monkeypatch.setenv(tracking.ALLOW_FILE_STORE_ENV, "true")  # reading MLflow >= 3.13's file store needs it too
    monkeypatch.setenv(tracking.TRACKING_URI_ENV, uri)  # MLflow 3.0's list_artifacts resolves runs:/ with the default
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == tracking.DEFAULT_EXPERIMENT
    params = run.data.params
    assert params["train.epochs"] == str(EPOCHS)
    assert params["train.lr"] == "0.001"
    assert params["spark.conf"] == "{}"
    assert params["run.world_size"] == "2" and params["run.device"] == "cpu"

    history = client.get_metric_history(run_id, "test_accuracy")
    assert [(m.step, round(m.value, 6)) for m in sorted(history, key=lambda m: m.step)] == [
        (e, round(0.5 + 0.1 * e, 6)) for e in range(1, EPOCHS + 1)]
    for name in ("train_loss", "test_loss", "samples_per_s", "data_wait_fraction"):
        assert len(client.get_metric_history(run_id, name)) == EPOCHS, name
    assert run.data.metrics["wall_seconds"] == pytest.approx(3.25)

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"manifest.json", "model"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/model.pt"]
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/manifest.json") == manifest

    # The loadable model gives the saved state_dict's logits.
    reference = SimpleCNN(len(CLASSES), IMAGE_SHAPE)
    reference.load_state_dict(torch.load(model_path, weights_only=True))
    reference.eval()
    monkeypatch.setattr(sys, "path", list(sys.path))  # a pickled model's code_paths go on sys.path
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/{tracking.MODEL_NAME}")
    x = torch.randn(5, 1, *IMAGE_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x))


def test_missing_model_file_still_logs_the_run(tmp_path, monkeypatch, caplog, tracking_log):
    mlflow = pytest.importorskip("mlflow")
    settings, manifest, metrics, _ = fake_run(tmp_path)
    with caplog.at_level(logging.WARNING, logger=tracking_log.name):
        run_id = tracking.log_training_run(settings, manifest, {**metrics, "history": [], "model_path": None},
                                           run_dir=tmp_path / "run")
    assert run_id is not None
    assert any("no model file" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv(tracking.ALLOW_FILE_STORE_ENV, "true")
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").as_uri())
    assert {a.path for a in client.list_artifacts(run_id)} == {"manifest.json"}
    assert client.get_experiment(client.get_run(run_id).info.experiment_id).name == tracking.DEFAULT_EXPERIMENT


def test_unreachable_server_is_a_warning_not_a_failure(tmp_path, monkeypatch, caplog, tracking_log):
    pytest.importorskip("mlflow")
    monkeypatch.setenv(tracking.TRACKING_URI_ENV, "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    settings, manifest, metrics, model_path = fake_run(tmp_path)
    with caplog.at_level(logging.WARNING, logger=tracking_log.name):
        run_id = tracking.log_training_run(settings, manifest, metrics, run_dir=tmp_path / "run")
    assert run_id is None
    warnings = [r.getMessage() for r in caplog.records if r.name == tracking_log.name]
    assert len(warnings) == 1 and "http://127.0.0.1:9" in warnings[0]
    assert os.environ[tracking.TRACKING_URI_ENV] == "http://127.0.0.1:9"


def test_a_broken_mlflow_install_is_a_warning(tmp_path, monkeypatch, caplog, tracking_log):
    import builtins

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise TypeError("Descriptors cannot be created directly")  # protobuf's message on a version clash
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    settings, manifest, metrics, model_path = fake_run(tmp_path)
    with caplog.at_level(logging.INFO, logger=tracking_log.name):
        assert tracking.log_training_run(settings, manifest, metrics, run_dir=tmp_path / "run") is None
    messages = [r.getMessage() for r in caplog.records if r.name == tracking_log.name]
    assert len(messages) == 1 and "failed to import" in messages[0]


def test_the_dataset_read_is_an_mlflow_dataset_input(tmp_path, monkeypatch):
    """mlflow.log_input: the manifest's dataset name and digest, the dataset directory as source; the params of a
    train-only run carry no ingest defaults (the pipeline leaves the ingest section out)."""
    mlflow = pytest.importorskip("mlflow")
    settings, manifest, metrics, model_path = fake_run(tmp_path)
    settings = {k: v for k, v in settings.items() if k != "ingest"}
    data_dir = tmp_path / "data" / "mnist"
    manifest = {**manifest, "dataset": "mnist"}
    run_id = tracking.log_training_run(settings, manifest, metrics, run_dir=tmp_path / "run",
                                       dataset_uri=str(data_dir))
    uri = (tmp_path / "run" / "mlruns").as_uri()
    monkeypatch.setenv(tracking.ALLOW_FILE_STORE_ENV, "true")
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "mnist"
    assert dataset_input.dataset.digest == manifest_digest(manifest)
    assert str(data_dir) in dataset_input.dataset.source
    assert [t.value for t in dataset_input.tags if t.key == "mlflow.data.context"] == ["training"]
    assert not any(k.startswith("ingest.") for k in run.data.params)
    assert manifest_digest(manifest) != manifest_digest({**manifest, "created_unix": 1.0})
