"""The composition root: checks, Spark session, ingest, launcher, per-rank function and tracking, wired in one place.

The ``spark-mnist`` command (:mod:`spark_mnist.cli`) and the notebook API (:func:`spark_mnist.ingest`,
:func:`spark_mnist.train`) are thin calls into :func:`ingest` and :func:`train`; nothing else wires the layers
together.  :func:`train` checks what can be refused once, before a Spark session or a rank starts (torch, the
launcher's package and hardware, the converter, the dataset, a checkpoint to resume), then starts the session that
``torch-distributor`` or an ingest needs when none is given.  ``driver/`` (Spark) and ``rank/`` (torch, every rank)
never import each other: this module hands :func:`spark_mnist.rank.train.train_worker` and a
:class:`~spark_mnist.job.TrainJob` to :func:`spark_mnist.launch.run_with_restarts`, which launches it
(:func:`spark_mnist.launch.launch`) and relaunches it from the last checkpoint when a rank fails, and logs the run to
MLflow (:mod:`spark_mnist.tracking`).
``torchrun`` and ``ai-runtime`` training imports no Spark (a session's modules import pyspark when one starts), and
ingest no torch (the rank modules are imported where training starts).
"""

import contextlib
import logging
import os
from typing import Any

from spark_mnist.config import Settings, TrainSettings
from spark_mnist.driver import session as sessions
from spark_mnist.driver.converter import ConverterChoice, choose_converter, make_converters
from spark_mnist.driver.ingest import ingest as run_ingest
from spark_mnist.envs import scoped_env
from spark_mnist.errors import InputError, LoaderStateError, require_extra
from spark_mnist.job import TrainJob
from spark_mnist.launch import check, run_with_restarts, world_size
from spark_mnist.launch.torch_distributor import check_shared_run_dir
from spark_mnist.paths import redact, require_local
from spark_mnist.rank.order import state_mismatch
from spark_mnist.runs import CURVES_NAME, dataset_identity
from spark_mnist.shards.contract import Dataset, Manifest, open_dataset
from spark_mnist.tools.plots import maybe_training_curves
from spark_mnist.tracking import log_training_run

__all__ = ["SPARK_LAUNCHER", "ingest", "train", "check_resume"]

log = logging.getLogger(__name__)

SPARK_LAUNCHER = "torch-distributor"  # the one launcher that runs on a Spark session (and petastorm's converter)


def _session(spark, settings: Settings, *, verbose: bool, needed: bool = True):
    """``spark``, or where it is ``None`` and a session is ``needed``, one started from ``settings.spark`` whose
    executors also get the stores' settings (:func:`spark_mnist.driver.session.spark_session`, stopped after the
    block)."""
    if spark is not None or not needed:
        return contextlib.nullcontext(spark)
    environment = settings.storage.environment()
    return sessions.spark_session(sessions.with_executor_env(settings.spark, environment), verbose=verbose)


def ingest(spark, settings: Settings, *, verbose: bool = False) -> Manifest:
    """Ingest ``settings.ingest`` (source -> Parquet shards + manifest) on ``spark``; driver-side.

    Args:
        spark: the Spark session (classic or Connect); ``None``: one started from ``settings.spark``.
        settings: the run's settings.
        verbose: Spark's own logs, for a session started here.
    Returns:
        The manifest published (:class:`spark_mnist.shards.contract.Manifest`).
    Raises:
        InputError: bad sources or output (its subclasses name the file and what is wrong).
    """
    # every ingest setting is a keyword of run_ingest: source, output, dataset, num_shards, row_group_bytes, strict
    with _session(spark, settings, verbose=verbose) as session, scoped_env(settings.storage.environment()):
        return run_ingest(session, **settings.ingest.dict())


def train(spark, settings: Settings, *, ingest_first: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Train on the dataset at ``settings.data_dir`` with the launcher ``settings.train.launcher``; driver-side.

    Everything that can be refused is checked once, in this order, before a session or a rank starts: torch, the
    launcher's package and hardware (:func:`spark_mnist.launch.check`), the converter and loader the launcher can
    serve, the dataset and the checkpoint to resume (:func:`check_resume`).  With ``ingest_first`` the dataset and
    the checkpoint are checked after the ingest, on the dataset it wrote.  Nothing is written before the launch.

    Args:
        spark: the Spark session for ``torch-distributor`` and the ingest (classic or Connect); ``None``: one started
            from ``settings.spark`` where needed (never for ``torchrun`` or ``ai-runtime`` alone).
        settings: the run's settings.
        ingest_first: ingest ``settings.ingest`` first (``spark-mnist run``); its settings are then tracked too.
        verbose: Spark's own logs, for a session started here.
    Returns:
        Rank 0's metrics (see :func:`spark_mnist.rank.train.train_worker`), plus ``dataset``, ``converter``
        (``"petastorm"`` or ``"none"``), ``launcher``, ``restarts`` and, when MLflow logged it, ``mlflow_run_id``.
        The same keys under every launcher.
    Raises:
        LauncherUnavailableError: torch or the launcher's package missing, its hardware absent.
        InputError: petastorm with a launcher other than ``torch-distributor``; bad ingest input.
        EnvironmentMismatchError: petastorm asked for where it cannot run.
        DatasetNotFoundError: no complete dataset at the data directory.
        LoaderStateError, CheckpointError: ``--resume`` with a checkpoint this run cannot continue.
        SourceError: ``torch-distributor`` with ``local_mode`` off and a run directory the executors do not share
            (:func:`spark_mnist.launch.torch_distributor.check_shared_run_dir`).
        TrainingFailedError: a rank failed, and kept failing through ``train.max_restarts`` relaunches.
    """
    t, on_spark = settings.train, settings.train.launcher == SPARK_LAUNCHER
    with scoped_env(settings.storage.environment()):  # the stores' settings, for the driver and the ranks it launches
        require_extra("torch", "torch", "training")
        check(t)
        # refused here, before a session starts; _train chooses on the session it got (an active one may differ)
        _converter(t, on_spark and (sessions.is_connect(spark) if spark else sessions.connect_expected(settings.spark)))
        if not ingest_first:
            dataset = open_dataset(settings.data_dir)
            resume = check_resume(settings, dataset.manifest)
        with _session(spark, settings, verbose=verbose, needed=on_spark or ingest_first) as session:
            if ingest_first:
                ingest(session, settings)
                dataset = open_dataset(settings.data_dir)
                resume = check_resume(settings, dataset.manifest)
            if on_spark and not t.local_mode:
                check_shared_run_dir(settings.run_dir, sessions.master_here(session))  # rank 0 writes on an executor
            return _train(session, settings, dataset, resume=resume, ingested=ingest_first)


def _converter(t: TrainSettings, connect: bool) -> ConverterChoice:
    """petastorm's converter or the shards (``torch-distributor`` only: the one launcher on a Spark session), as
    :func:`spark_mnist.driver.converter.choose_converter` decides; the shards for the other launchers, which refuse
    petastorm."""
    if t.launcher == SPARK_LAUNCHER:
        return choose_converter(t, connect=connect)
    if "petastorm" in (t.loader, t.converter):
        raise InputError(
            f"train.loader {t.loader!r}, train.converter {t.converter!r}: petastorm's converter is a "
            f"Spark job and needs --launcher {SPARK_LAUNCHER}; launcher {t.launcher!r} reads the "
            f"ingested shards (--loader spark-mnist --converter none)"
        )
    return ConverterChoice("none", f"launcher {t.launcher!r}")


def check_resume(settings: Settings, manifest: Manifest) -> bool:
    """Whether this run continues from the checkpoint in its run directory: the driver's one resume check, the
    ranks' own rule (:meth:`spark_mnist.rank.checkpoint.Checkpoint.batch_size_for`, then
    :func:`spark_mnist.rank.order.state_mismatch` against this run's training order), before anything starts.

    Another world size is honoured (elastic resume: the checkpoint's global batch split over this run's ranks).
    With ``train.resume`` a checkpoint the ranks would refuse is refused here; with ``train.auto_resume`` alone it
    is left for the fresh run to overwrite, said in one line (``resume: starting afresh: ...``).  Reads the
    checkpoint only (weights-only, on the CPU); the ranks keep their own check.

    Args:
        settings: the run's settings (``run_dir``, ``train.seed``, ``batch_size``, the launcher's world size).
        manifest: the dataset's manifest (its identity and training rows are checked too).
    Returns:
        ``True`` to resume; ``False`` with neither setting, without a checkpoint, or (``auto_resume``) with one of
        another run.
    Raises:
        LoaderStateError: with ``resume``, a checkpoint of another seed, dataset, row count or global batch size, or
            a world size that does not divide its global batch; one line naming the setting, the checkpoint's value
            and this run's (``Cannot resume: the seed is 0 in RUN/checkpoint.pt, 7 in this run.``).
        CheckpointError: with ``resume``, a checkpoint that weights-only loading refuses or that is not a training
            checkpoint.
        SourceError: a run directory with no local form.
    """
    from spark_mnist.rank.checkpoint import load_checkpoint  # torch: not for ingest

    t = settings.train
    if not (t.resume or t.auto_resume):
        return False
    run_dir = require_local(settings.run_dir, "run_dir")
    try:  # CheckpointError, LoaderStateError: InputErrors, refused with --resume
        checkpoint = load_checkpoint(run_dir)
        if checkpoint is None:
            log.info("resume: starting afresh: no checkpoint in %s", run_dir)
            return False
        saved, ranks = checkpoint.loader, world_size(t)
        batch_size = t.batch_size if saved["world_size"] == ranks else checkpoint.batch_size_for(ranks)
        current = {"seed": t.seed, "shuffle": True, "drop_remainder": True, "dataset": dataset_identity(manifest)}
        current.update(rows=manifest.splits["train"].rows, world_size=ranks, batch_size=batch_size)
        if mismatch := state_mismatch(saved, {**current, "global_batch_size": batch_size * ranks}, checkpoint.source):
            raise LoaderStateError(mismatch)
    except InputError as e:
        if t.resume:
            raise
        log.info("resume: starting afresh: %s", e)
        return False
    log.info("resume: continuing from %s (epoch %d, step %d)", checkpoint.source, saved["epoch"] + 1, saved["step"])
    return True


def _train(spark, settings: Settings, dataset: Dataset, *, resume: bool, ingested: bool) -> dict[str, Any]:
    """The checked run: petastorm's converters or the shards, the launch and its restarts, the curves and tracking."""
    from spark_mnist.rank.train import train_worker  # torch: not for ingest

    t, manifest = settings.train, dataset.manifest
    choice = _converter(t, sessions.is_connect(spark))  # on the session it got
    # what the ranks get beside the settings and the files (:class:`~spark_mnist.job.TrainJob`), and the log shows
    facts: dict[str, Any] = {"dataset": manifest.dataset, "num_classes": len(manifest.classes)}
    facts.update(image_shape=manifest.image_shape, run_dir=require_local(settings.run_dir, "run_dir"))
    facts["dataset_id"] = dataset_identity(manifest)
    what = "petastorm" if choice.name == "petastorm" else "none, the ranks read the ingested shards"
    log.info("converter: %s (%s)", what, choice.reason)
    converters: dict[str, Any] = {}
    files = {split: dataset.files(split) for split in ("train", "test")}
    if choice.name == "petastorm":
        converters = make_converters(spark, dataset, t.petastorm_cache_url, t.petastorm_row_group_bytes)
        files = {split: list(c.file_urls) for split, c in converters.items()}
    try:
        counts = {"train_files": len(files["train"]), "test_files": len(files["test"])}
        log.info("training with %s: %s", t.launcher, redact(str({**t.dict(), **facts, **counts})))
        converter = converters["train"] if t.loader == "petastorm" else None
        job = TrainJob(t, files["train"], files["test"], train_converter=converter, **facts)
        metrics = run_with_restarts(train_worker, job, resume=resume)
    finally:
        for split, converter in converters.items():
            try:
                converter.delete()
            except Exception as e:  # noqa: BLE001 - the run's outcome stands; a leftover cache is only disk
                log.warning("could not delete petastorm's cache of the %s split: %s", split, e)
    result = {"dataset": manifest.dataset, "converter": choice.name, "launcher": t.launcher, **metrics}
    maybe_training_curves(metrics["history"], os.path.join(job.run_dir, CURVES_NAME))  # warns without matplotlib
    params = {k: v for k, v in settings.dict().items() if ingested or k != "ingest"}
    run_id = log_training_run(params, manifest.to_dict(), result, run_dir=job.run_dir, dataset_uri=dataset.location.uri)
    if run_id is not None:
        result["mlflow_run_id"] = run_id
    return result
