"""MLflow tracking of a training run; driver-side, optional.  See docs/concepts/launchers.md (Tracking).

:func:`log_training_run` records one finished training run: the settings as parameters, the per-epoch figures as
metrics (``step`` = epoch), the dataset the run read as an MLflow dataset input (``mlflow.log_input``: its registry
name, the manifest's digest and the dataset directory as source, context ``training``),
the ingest manifest as ``manifest.json``, the ``state_dict`` file as ``model/model.pt``
and, where ``mlflow.pytorch`` imports, a loadable MLflow PyTorch model (``pytorch_model``) with a tensor signature
(see :func:`_log_pytorch_model` for its format).  Where the model flavour cannot be logged (no ``mlflow.pytorch``,
an MLflow too old or too slim for it), only the ``state_dict`` artifact is logged and a warning says so.

Where runs go (:func:`tracking_uri`): ``MLFLOW_TRACKING_URI`` when set; the workspace's tracking server
(``databricks``) on a Databricks cluster; else a local file store, ``<run_dir>/mlruns``.

MLflow is an optional extra (``pip install 'spark-mnist[mlflow]'``; Databricks ML runtimes ship it): without it
training runs as before and one log line says tracking is off.  Tracking never fails training: an MLflow error
(an unreachable server, a permission error, a broken install) is logged as a warning and the run id is ``None``.
An unreachable HTTP server costs MLflow's own retries first (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``).

The local file store is MLflow's ``file:`` backend, refused by MLflow >= 3.13 unless ``MLFLOW_ALLOW_FILE_STORE=true``;
this module sets that variable for the duration of the call when it is not set, so reading the store back
(``MlflowClient``, ``mlflow ui``) needs it set too.  Set ``MLFLOW_TRACKING_URI`` (``sqlite:///...`` with the full
``mlflow`` package, or a server) to use another backend.

Nothing global is left changed: the tracking URI is set for the duration of the call and restored (with the
``MLFLOW_TRACKING_URI`` variable that ``mlflow.set_tracking_uri`` also writes), as are ``MLFLOW_ALLOW_FILE_STORE``
and ``TORCHINDUCTOR_CACHE_DIR`` (which ``torch.export`` sets), and the experiment is passed by id rather than
through ``mlflow.set_experiment``.
"""

import hashlib
import inspect
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from spark_mnist.envs import scoped_env
from spark_mnist.paths import redact, require_local

__all__ = ["DEFAULT_EXPERIMENT", "MODEL_NAME", "on_databricks", "tracking_uri", "flatten_params", "log_training_run"]

log = logging.getLogger(__name__)

# The experiment every run goes to; on Databricks a workspace path, under the user's home folder
# (``/Users/<user>/spark-mnist``, or ``/Shared/spark-mnist`` when the user cannot be found: :func:`_experiment_name`).
DEFAULT_EXPERIMENT = "spark-mnist"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# MLflow >= 3.13 refuses the file store unless this is "true".
ALLOW_FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"
MODEL_NAME = "pytorch_model"
# Per-epoch figures of ``metrics["history"]`` logged as MLflow metrics with step = epoch.
EPOCH_METRICS = ("train_loss", "test_loss", "test_accuracy", "samples_per_s", "data_wait_fraction", "epoch_seconds")
# The facts of the run logged as ``run.*`` params.
RUN_PARAMS = "dataset world_size device loader steps_per_epoch batch_size samples_per_epoch epochs".split()


def on_databricks() -> bool:
    """Whether this process runs on a Databricks cluster (the runtime sets ``DATABRICKS_RUNTIME_VERSION``)."""
    return bool(os.environ.get("DATABRICKS_RUNTIME_VERSION"))


def tracking_uri(run_dir: str | os.PathLike) -> str:
    """Where MLflow runs go: ``MLFLOW_TRACKING_URI`` when set, ``databricks`` on Databricks, else the local file
    store ``file:///<absolute run_dir>/mlruns``.  ``run_dir`` may be a path or a ``file:`` URI.

    Raises:
        SourceError: for the file store, a ``run_dir`` with no local path (``s3://...``).
    """
    if os.environ.get(TRACKING_URI_ENV):
        return os.environ[TRACKING_URI_ENV]
    return "databricks" if on_databricks() else (Path(require_local(run_dir, "run_dir")) / "mlruns").as_uri()


def flatten_params(settings: Mapping[str, Any], prefix: str = "", *, max_value_length: int = 6000) -> dict[str, str]:
    """Nested settings -> ``{"train.epochs": "4", ...}``: keys joined with ".", characters MLflow rejects in keys
    replaced by "_", values as strings (lists and dicts as JSON, an empty dict as ``{}``) with a URI's credentials
    redacted (:func:`spark_mnist.paths.redact`), then cut to ``max_value_length`` characters."""
    out: dict[str, str] = {}
    for key, value in settings.items():
        # MLflow's limits (every MLflow from 2.9 on): param values of at most 6000 characters, keys of at most 250
        # characters from letters, digits, "_", "-", ".", " " and "/".
        name = re.sub(r"[^\w\-. /]", "_", f"{prefix}{key}")[:250]
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, f"{name}.", max_value_length=max_value_length))
            continue
        text = json.dumps(value, default=str, sort_keys=True) if isinstance(value, (dict, list, tuple)) else str(value)
        text = redact(text)  # a URI's credentials stay out of MLflow
        out[name] = text if len(text) <= max_value_length else text[: max_value_length - 3] + "..."
    return out


def log_training_run(
    settings_dict: Mapping[str, Any],
    manifest: Mapping[str, Any],
    metrics: Mapping[str, Any],
    *,
    run_dir: str | os.PathLike,
    dataset_uri: str | None = None,
) -> str | None:
    """Log one finished training run to MLflow; driver-side, after ``TorchDistributor`` returns.

    Args:
        settings_dict: the run's settings by section (``Settings.dict()``, without ``ingest`` when the run did
            not ingest: the dataset read is the manifest's); logged as flattened params (``train.epochs``, ...).
        manifest: the ingest manifest (``open_dataset(OUT).manifest.to_dict()``); logged as ``manifest.json``;
            its ``classes`` and ``image_shape`` size the model.
        metrics: rank 0's metrics (:func:`spark_mnist.rank.train.train_worker`): ``history`` -> per-epoch metrics,
            ``train_seconds``/``wall_seconds`` -> metrics, ``dataset``/``world_size``/``device``/... -> ``run.*``
            params; ``model_path``, the saved ``state_dict``, is logged as ``model/<name>`` and as a loadable MLflow
            PyTorch model ``pytorch_model`` when ``mlflow.pytorch`` is available (``None`` or a missing file: no
            model is logged).
        run_dir: the run directory; the local file store is ``<run_dir>/mlruns`` (see :func:`tracking_uri`).
        dataset_uri: where the ranks read the dataset (its directory); the dataset input's source.  ``None``: no
            dataset input is logged.
    Returns:
        The MLflow run id; ``None`` when MLflow is not installed or tracking failed (logged as a warning).
    """
    try:
        import mlflow  # an optional extra: training runs without it
    except ImportError:
        log.info("MLflow is not installed; tracking is off (pip install 'spark-mnist[mlflow]')")
        return None
    except Exception as e:  # noqa: BLE001 - a broken install (e.g. a protobuf clash) must not fail training
        log.warning("MLflow failed to import, tracking is off: %s: %s", type(e).__name__, e)
        return None
    uri = tracking_uri(run_dir)
    # The file store's opt-in (MLflow >= 3.13), unless the user set it either way.
    allow = {ALLOW_FILE_STORE_ENV: "true"} if uri.startswith("file:") and ALLOW_FILE_STORE_ENV not in os.environ else {}
    try:
        params = flatten_params({**settings_dict, "run": {k: metrics[k] for k in RUN_PARAMS if k in metrics}})
        run_name = f"{manifest['dataset']}-{metrics['world_size']}x{metrics['device']}"
        # MLflow's own scope for its module-level tracking URI (private; in every MLflow from 2.9 to 3.x): set for
        # the block, then the previous one back.  It also writes MLFLOW_TRACKING_URI, which scoped_env restores.
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        # Put back as they were after logging: torch.export (the pt2 model format) pins the inductor cache dir.
        with scoped_env(allow, restore=(TRACKING_URI_ENV, "TORCHINDUCTOR_CACHE_DIR")), _use_tracking_uri(uri):
            name = _experiment_name(DEFAULT_EXPERIMENT, uri)  # looked up and made at ``uri``, which the block has set
            found = mlflow.get_experiment_by_name(name)
            experiment_id = found.experiment_id if found is not None else mlflow.create_experiment(name)
            # nested=True: under the run the caller has open (a notebook's), else a top-level run.
            with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, nested=True) as run:
                mlflow.set_tags({f"spark_mnist.{key}": metrics.get(key) for key in ("dataset", "device", "loader")})
                mlflow.log_params(params)
                # An empty dict logs nothing (MLflow's log_batch returns early).
                for record in metrics["history"]:  # a figure an epoch lacks (None) is not logged for it
                    figures = {k: float(record[k]) for k in EPOCH_METRICS if record.get(k) is not None}
                    mlflow.log_metrics(figures, step=int(record["epoch"]))
                mlflow.log_metrics({k: float(metrics[k]) for k in ("train_seconds", "wall_seconds")})  # whole run
                mlflow.log_dict(json.loads(redact(json.dumps(dict(manifest), default=str))), "manifest.json")
                if dataset_uri is not None:
                    _log_dataset_input(mlflow, manifest, dataset_uri)
                if (model_path := metrics.get("model_path")) is not None and os.path.isfile(model_path):
                    mlflow.log_artifact(os.fspath(model_path), "model")
                    _log_pytorch_model(mlflow, os.fspath(model_path), metrics.get("model"), manifest)
                else:
                    log.warning("no model file at %s; the MLflow run has no model", model_path)
    except Exception as e:  # noqa: BLE001 - tracking must never fail training
        error = f"{type(e).__name__}: {redact(str(e))}"
        log.warning("MLflow tracking to %s failed, training results are not tracked: %s", uri, error)
        return None
    log.info("MLflow run %s logged to %s", run.info.run_id, uri)
    return run.info.run_id


def _log_dataset_input(mlflow, manifest: Mapping[str, Any], dataset_uri: str) -> None:
    """``mlflow.log_input`` of the dataset read, in the active run: an MLflow ``MetaDataset`` named as the manifest's
    dataset, with the manifest's digest and ``dataset_uri`` (credentials redacted) as its source (MLflow's
    resolver picks the source type: a local or ``/Volumes`` path, ``s3://``, ...), context ``training``.  A failure
    is a warning.
    Source: MLflow's ``mlflow.data`` (``MetaDataset``, ``resolve_dataset_source``), dataset tracking."""
    try:  # mlflow: the optional extra, imported where tracking runs
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(redact(dataset_uri))
        # The digest: the first 16 hex digits (MLflow stores at most 36 characters) of the sha256 of the manifest as
        # canonical JSON (sorted keys): one ingest's identity, as its source files, rows and shards are in it.
        canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
        digest = hashlib.sha256(canonical, usedforsecurity=False).hexdigest()[:16]
        dataset = MetaDataset(source=source, name=manifest["dataset"], digest=digest)  # type: ignore[abstract]  # concrete
        mlflow.log_input(dataset, context="training")
    except Exception as e:  # noqa: BLE001 - the run, its params and its model stand without the dataset input
        error = f"{type(e).__name__}: {redact(str(e))}"
        log.warning("could not log the dataset %s as an MLflow dataset input: %s", redact(dataset_uri), error)


def _log_pytorch_model(mlflow, model_path: str, model_name: str | None, manifest: Mapping[str, Any]) -> None:
    """Log a loadable MLflow PyTorch model built from the ``state_dict``; a failure here is a warning, the run and
    its ``state_dict`` artifact stay.  The model is built by name (:func:`spark_mnist.models.build_model`):
    ``model_name``, the one training recorded in its metrics, else :data:`spark_mnist.models.DEFAULT_MODEL`.

    With MLflow >= 3 and torch >= 2.4 the model is saved as ``pt2`` (``torch.export``: a traced graph, loadable
    without this package's code and without unpickling); otherwise (MLflow 2.x, as on Databricks 15.4/16.4 LTS ML)
    it is pickled, with the ``spark_mnist`` package as its ``code_paths`` so loading needs no installed package.
    The signature is written out rather than inferred: MLflow's inference imports scipy, which mlflow-skinny lacks.
    """
    try:
        # torch (and models, which imports it) and mlflow's pytorch flavour: extras, and the CLI's torch-free
        # commands import this module.
        import mlflow.pytorch
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from spark_mnist.models import DEFAULT_MODEL, build_model

        (height, width), num_classes = manifest["image_shape"], len(manifest["classes"])
        model = build_model(model_name or DEFAULT_MODEL, num_classes, (height, width)).eval()
        model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
        accepted = inspect.signature(mlflow.pytorch.log_model).parameters
        # float32 (-1, 1, H, W) normalised images -> float32 (-1, classes) logits.
        images = TensorSpec(np.dtype(np.float32), (-1, 1, height, width))
        signature = ModelSignature(Schema([images]), Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]))
        # Explicit requirements: MLflow's inference would load the model in a subprocess (seconds).
        kwargs: dict[str, Any] = {"pip_requirements": [f"torch=={torch.__version__.split('+')[0]}"]}
        # torch.__version__ is a TorchVersion, compared as a version, not as a string.
        if "serialization_format" in accepted and torch.__version__ >= "2.4":
            # A batch of 2: torch.export makes a size-1 dimension static, and the batch must stay dynamic.
            kwargs.update(serialization_format="pt2", input_example=np.zeros((2, 1, height, width), np.float32))
        else:
            kwargs["code_paths"] = [os.path.dirname(__file__)]  # this module's folder: the spark_mnist package
        kwargs["name" if "name" in accepted else "artifact_path"] = MODEL_NAME  # MLflow 3 / MLflow 2
        mlflow.pytorch.log_model(model, signature=signature, **kwargs)
    # An ImportError (an MLflow too old or too slim for the flavour) is said the same way as a failure to log it.
    except Exception as e:  # noqa: BLE001 - the model flavour is optional: the state_dict is logged anyway
        log.warning("could not log the MLflow PyTorch model (%s: %s); logged the state_dict only", type(e).__name__, e)


def _experiment_name(experiment: str, uri: str) -> str:
    """On Databricks experiments are workspace paths: a relative name goes under the home folder of the workspace
    user this process runs as (databricks-sdk, an mlflow-skinny dependency), else under ``/Shared``."""
    if not uri.startswith("databricks") or experiment.startswith("/"):
        return experiment
    try:
        from databricks.sdk import WorkspaceClient  # on Databricks only: mlflow-skinny brings it there

        return f"/Users/{WorkspaceClient().current_user.me().user_name}/{experiment}"
    except Exception:  # noqa: BLE001 - no workspace user (off Databricks, no auth): the /Shared folder instead
        return f"/Shared/{experiment}"
