"""The composition root: ingest, launcher, per-rank function and tracking, wired in one place.

The ``spark-mnist`` command (:mod:`spark_mnist.cli`) and the notebook API (:func:`spark_mnist.ingest`,
:func:`spark_mnist.train`) call these functions; nothing else wires the layers together.  ``driver/`` (Spark) and
``rank/`` (torch, every rank) never import each other: this module hands :func:`spark_mnist.rank.train.train_worker`
and a :class:`~spark_mnist.job.TrainJob` to the launcher that ``train.launcher`` names (:mod:`spark_mnist.launch`),
relaunches it from the last checkpoint when a rank fails (:mod:`spark_mnist.launch.restarts`), and logs the run to
MLflow (:mod:`spark_mnist.tracking`).  Imports are lazy: ``torchrun`` and ``ai-runtime`` training imports no
Spark, and ingest no torch.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from spark_mnist.config import Settings
from spark_mnist.envs import scoped_env
from spark_mnist.errors import InputError, check_choice
from spark_mnist.paths import redact, require_local

if TYPE_CHECKING:
    from spark_mnist.shards.contract import Dataset, Manifest

log = logging.getLogger(__name__)

SPARK_LAUNCHER = "torch-distributor"  # the one launcher that runs on a Spark session (and petastorm's converter)


def ingest(spark, settings: Settings) -> "Manifest":
    """Ingest ``settings.ingest`` (source -> Parquet shards + manifest) on ``spark``; driver-side.

    Returns:
        The manifest published (:class:`spark_mnist.shards.contract.Manifest`).
    Raises:
        InputError: bad sources or output (its subclasses name the file and what is wrong).
    """
    from spark_mnist.driver.ingest import ingest as run_ingest

    s = settings.ingest
    with scoped_env(settings.storage.environment()):  # the stores' settings, for the driver's reads and commit
        manifest = run_ingest(
            spark,
            s.source,
            s.output,
            dataset=s.dataset,
            num_shards=s.num_shards,
            row_group_bytes=s.row_group_bytes,
            strict=s.strict,
        )
    log.info(
        "dataset %s at %s: %s",
        manifest.dataset,
        redact(s.output),
        ", ".join(f"{name} {info.rows} rows in {len(info.files)} shards" for name, info in manifest.splits.items()),
    )
    return manifest


def check_training(settings: Settings, *, connect: bool = False) -> None:
    """What can be refused before a Spark session or a rank starts: torch, the launcher's package and hardware,
    the model's name, the converter and loader the launcher can serve, and with ``train.resume`` a checkpoint this
    run cannot continue (:func:`check_resume`, against the manifest at the data directory when there is one).
    Reads only: nothing is written to the run directory.

    Raises:
        LauncherUnavailableError: torch or the launcher's package missing, its hardware absent.
        InputError: an unknown model; petastorm with a launcher other than ``torch-distributor``.
        EnvironmentMismatchError: petastorm asked for where it cannot run.
        LoaderStateError, CheckpointError: see :func:`check_resume`.
    """
    _check_environment(settings, connect=connect)
    if settings.train.resume:
        with scoped_env(settings.storage.environment()):
            check_resume(settings, _manifest_if_any(settings.data_dir))


def _manifest_if_any(data_dir: str) -> "Manifest | None":
    """The manifest of the dataset at ``data_dir``, or ``None`` where none opens (yet: ``run`` ingests it later;
    ``train`` refuses it afterwards with the dataset's own error)."""
    from spark_mnist.shards.contract import open_dataset

    try:
        return open_dataset(data_dir).manifest
    except InputError:
        return None


def check_resume(settings: Settings, manifest: "Manifest | None" = None) -> None:
    """With ``train.resume``, refuse on the driver a checkpoint in the run directory that the ranks would refuse:
    the same checks as theirs (:meth:`spark_mnist.rank.checkpoint.Checkpoint.batch_size_for`, then
    :func:`spark_mnist.rank.order.state_mismatch` against this run's training order), before a Spark job, a
    TorchDistributor run or a torchrun launch starts.  Reads the checkpoint only (weights-only, on the CPU).  The
    ranks keep their own check.

    Args:
        settings: the run's settings (``run_dir``, ``train.seed``, ``batch_size``, the launcher's world size).
        manifest: the dataset's manifest (its identity and training rows are checked too); ``None``: those are not.
    Raises:
        LoaderStateError: a checkpoint of another seed, dataset, row count or global batch size, or a world size that
            does not divide its global batch; one line naming the setting, the checkpoint's value and this run's
            (``Cannot resume: the seed is 0 in RUN/checkpoint.pt, 7 in this run.``).
        CheckpointError: a checkpoint that weights-only loading refuses or that is not a training checkpoint.
        SourceError: a run directory with no local form.
    """
    from spark_mnist.errors import LoaderStateError
    from spark_mnist.launch import world_size
    from spark_mnist.rank.checkpoint import load_checkpoint
    from spark_mnist.rank.order import state_mismatch
    from spark_mnist.runs import dataset_identity

    t = settings.train
    if not t.resume:
        return
    checkpoint = load_checkpoint(require_local(settings.run_dir, "run_dir"))
    if checkpoint is None:  # the ranks start afresh and say so
        return
    saved, ranks = checkpoint.loader, world_size(t)
    batch_size = t.batch_size if saved["world_size"] == ranks else checkpoint.batch_size_for(ranks)
    train = manifest.splits.get("train") if manifest is not None else None
    current = {
        "seed": t.seed,
        "shuffle": True,
        "drop_remainder": True,
        "world_size": ranks,
        "batch_size": batch_size,
        "global_batch_size": batch_size * ranks,
        "dataset": dataset_identity(manifest) if manifest is not None else None,
        "rows": train.rows if train is not None else saved["rows"],
    }
    mismatch = state_mismatch(saved, current, checkpoint.source)
    if mismatch:
        raise LoaderStateError(mismatch)


def _check_environment(settings: Settings, *, connect: bool = False) -> None:
    """:func:`check_training` without the checkpoint: torch, the launcher, the model, the converter and loader."""
    from spark_mnist.errors import require_extra
    from spark_mnist.launch import check_launcher

    t = settings.train
    require_extra("torch", "torch", "training")
    check_launcher(t)
    from spark_mnist.models import MODELS

    check_choice("train.model", t.model, MODELS, InputError)
    if t.launcher == SPARK_LAUNCHER:
        from spark_mnist.driver.converter import choose_converter

        choose_converter(t, connect=connect)
    elif "petastorm" in (t.loader, t.converter):
        raise InputError(
            f"train.loader {t.loader!r}, train.converter {t.converter!r}: petastorm's converter is a "
            f"Spark job and needs --launcher {SPARK_LAUNCHER}; launcher {t.launcher!r} reads the "
            f"ingested shards (--loader spark-mnist --converter none)"
        )


def train(spark, settings: Settings, *, ingested: bool = False) -> dict[str, Any]:
    """Train on the dataset at ``settings.data_dir`` with the launcher ``settings.train.launcher``; driver-side.

    Args:
        spark: the Spark session for ``torch-distributor`` (classic or Connect); ``None`` for the other launchers.
        settings: the run's settings.
        ingested: whether this invocation ingested the dataset (its ``ingest`` settings are then tracked too;
            otherwise only what the manifest says of the dataset read).
    Returns:
        Rank 0's metrics (see :func:`spark_mnist.rank.train.train_worker`), plus ``dataset``, ``converter``
        (``"petastorm"`` or ``"none"``), ``launcher``, ``restarts`` and, when MLflow logged it, ``mlflow_run_id``.
        The same keys under every launcher.
    Raises:
        DatasetNotFoundError: no complete dataset at the data directory.
        InputError, LauncherUnavailableError, EnvironmentMismatchError: see :func:`check_training`.
        SourceError: ``torch-distributor`` with ``local_mode`` off and a run directory the executors do not share
            (:func:`spark_mnist.launch.torch_distributor.check_shared_run_dir`).
        LoaderStateError, CheckpointError: ``--resume`` with a checkpoint this run cannot continue
            (:func:`check_resume`), raised before anything is launched or written.
        TrainingFailedError: a rank failed, and kept failing through ``train.max_restarts`` relaunches.
    """
    with scoped_env(settings.storage.environment()):  # the stores' settings, for the driver and the ranks it launches
        return _train(spark, settings, ingested=ingested)


def _train(spark, settings: Settings, *, ingested: bool) -> dict[str, Any]:
    from spark_mnist.launch import launcher_for

    t = settings.train
    connect = False
    if t.launcher == SPARK_LAUNCHER and spark is not None:
        from spark_mnist.driver import session

        connect = session.is_connect(spark)
    _check_environment(settings, connect=connect)
    launcher = launcher_for(t, spark=spark)
    if t.launcher == SPARK_LAUNCHER and not t.local_mode:
        from spark_mnist.driver.session import master_here
        from spark_mnist.launch.torch_distributor import check_shared_run_dir

        check_shared_run_dir(settings.run_dir, master_here(spark))  # rank 0 writes it on an executor
    from spark_mnist.runs import CURVES_NAME, dataset_identity
    from spark_mnist.shards.contract import open_dataset

    dataset = open_dataset(settings.data_dir)
    manifest = dataset.manifest
    check_resume(settings, manifest)  # before petastorm's Spark jobs and the launch: nothing started, nothing written
    converter_name, converters, files = _files(spark, settings, dataset)
    try:
        from spark_mnist.job import TrainJob

        job = TrainJob(
            settings=t,
            train_files=files["train"],
            test_files=files["test"],
            dataset=manifest.dataset,
            num_classes=len(manifest.classes),
            image_shape=manifest.image_shape,
            run_dir=require_local(settings.run_dir, "run_dir"),
            train_converter=converters["train"] if t.loader == "petastorm" else None,
            dataset_id=dataset_identity(manifest),
        )
        log.info("training with %s: %s", launcher.name, redact(str(job.summary())))
        metrics = _run(launcher, job)
    finally:
        for split, converter in converters.items():
            try:
                converter.delete()
            except Exception as e:  # noqa: BLE001 - the run's outcome stands; a leftover cache is only disk
                log.warning("could not delete petastorm's cache of the %s split: %s", split, e)
    result = {"dataset": manifest.dataset, "converter": converter_name, "launcher": launcher.name, **metrics}
    from spark_mnist.tools.plots import maybe_training_curves  # never raises; warns once without matplotlib
    from spark_mnist.tracking import log_training_run

    maybe_training_curves(metrics["history"], os.path.join(job.run_dir, CURVES_NAME))
    params = {k: v for k, v in settings.to_dict().items() if ingested or k != "ingest"}
    run_id = log_training_run(
        params,
        manifest.to_dict(),
        result,
        result.get("model_path"),
        run_dir=job.run_dir,
        dataset_uri=dataset.location.uri,
    )
    if run_id is not None:
        result["mlflow_run_id"] = run_id
    return result


def _files(spark, settings: Settings, dataset: "Dataset"):
    """``(converter name, petastorm converters by split, files by split)``: petastorm's cache where the converter
    choice says so (torch-distributor only), else the ingested shards the manifest names."""
    t = settings.train
    if t.launcher == SPARK_LAUNCHER:
        from spark_mnist.driver import session
        from spark_mnist.driver.converter import choose_converter, make_converters

        choice = choose_converter(t, connect=session.is_connect(spark))
        if choice.uses_petastorm:
            log.info("converter: petastorm (%s)", choice.reason)
            converters = make_converters(spark, dataset, t.petastorm_cache_url, t.petastorm_row_group_bytes)
            return choice.name, converters, {s: list(c.file_urls) for s, c in converters.items()}
        log.info("converter: none, the ranks read the ingested shards (%s)", choice.reason)
    return "none", {}, {split: dataset.files(split) for split in ("train", "test")}


def _run(launcher, job) -> dict[str, Any]:
    """The ranks, launched and relaunched: ``resume`` as the settings (or ``auto_resume``) say, then from the last
    checkpoint after a failure, at most ``max_restarts`` times."""
    from spark_mnist.launch import launch
    from spark_mnist.launch.restarts import run_with_restarts
    from spark_mnist.rank.train import train_worker
    from spark_mnist.runs import CHECKPOINT_NAME

    t = job.settings
    resume = t.resume or (t.auto_resume and _auto_resume(job))

    def attempt(resume_now: bool) -> dict[str, Any]:
        return launch(launcher, train_worker, _with_resume(job, resume_now))

    return run_with_restarts(
        attempt, max_restarts=t.max_restarts, checkpoint=os.path.join(job.run_dir, CHECKPOINT_NAME), resume=resume
    )


def _with_resume(job, resume: bool):
    from dataclasses import replace

    return job if job.settings.resume == resume else replace(job, settings=job.settings.copy(update={"resume": resume}))


def _auto_resume(job) -> bool:
    """``auto_resume``: whether the run directory's checkpoint is of this run (its seed, dataset and global batch
    size), said in one line (``resume: auto, ...``).  A checkpoint of another run is left for the fresh run to
    overwrite."""
    from spark_mnist.launch import world_size
    from spark_mnist.rank.checkpoint import CheckpointError, load_checkpoint

    t = job.settings
    try:
        checkpoint = load_checkpoint(job.run_dir)
    except CheckpointError as e:
        log.info("resume: auto, starting afresh: %s", e)
        return False
    if checkpoint is None:
        log.info("resume: auto, starting afresh: no checkpoint in %s", job.run_dir)
        return False
    wanted = {"seed": t.seed, "dataset": job.dataset_id, "global_batch_size": t.batch_size * world_size(t)}
    for key, value in wanted.items():
        saved = checkpoint.loader.get(key)
        if value is not None and saved is not None and saved != value:
            log.info("resume: auto, starting afresh: %s has %s %r, this run %r", checkpoint.source, key, saved, value)
            return False
    log.info(
        "resume: auto, continuing from %s (epoch %d, step %d)", checkpoint.source, checkpoint.epoch + 1, checkpoint.step
    )
    return True
