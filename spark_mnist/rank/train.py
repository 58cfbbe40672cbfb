"""The per-rank DDP training loop: the function ``TorchDistributor`` runs in every rank.

Each rank reads its facts once (:class:`spark_mnist.rank.world.World`), joins the process group
(:mod:`spark_mnist.rank.process`), trains on its exact share of the training split
(:class:`spark_mnist.rank.loader.ShardLoader`) with the steps of :mod:`spark_mnist.rank.step`, evaluates on its share
of the full test split (counts summed over ranks), and rank 0 prints per-epoch figures, checkpoints
(:mod:`spark_mnist.rank.checkpoint`) and saves the model ``state_dict`` and the metrics in the run directory
(:mod:`spark_mnist.runs`); drawing the curves is the caller's (the metrics' ``history``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Generator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from spark_mnist.errors import InputError
from spark_mnist.fs import replacing
from spark_mnist.job import TrainJob
from spark_mnist.models import Normalization, build_model, normalization_for
from spark_mnist.rank.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, to_cpu
from spark_mnist.rank.loader import ShardLoader
from spark_mnist.rank.petastorm import petastorm_batches
from spark_mnist.rank.process import abort_process_group, init_process_group, rank_device, threads_per_rank
from spark_mnist.rank.step import DataWait, TrainStep, evaluate, to_input
from spark_mnist.rank.world import World
from spark_mnist.runs import METRICS_NAME, MODEL_NAME, write_error_report

__all__ = ["PROGRESS_LINES_PER_EPOCH", "train_worker"]

PROGRESS_LINES_PER_EPOCH = 4


@dataclass
class _Run:
    """One rank's training state: what the epoch and checkpoint functions share."""

    job: TrainJob
    world: World
    device: torch.device
    model: torch.nn.Module  # the module, not the DDP wrapper (what is saved)
    optimizer: torch.optim.Optimizer
    step: TrainStep
    norm: Normalization
    channels_last: bool  # model and input in channels_last (train.channels_last)
    batch_size: int  # per rank: train.batch_size, or what holds a resumed checkpoint's global batch
    steps: int = 0  # steps per epoch, equal on every rank
    run_steps: int = 0  # steps this invocation ran (what train.max_steps counts)


def train_worker(job: TrainJob) -> dict[str, Any]:
    """Train in this rank; return the run's metrics.  Runs in every rank, started by ``TorchDistributor``.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` once (:meth:`World.from_env`), joins the
    process group and trains ``job.settings.model`` for ``job.settings.epochs`` epochs.  Every rank runs exactly
    :func:`spark_mnist.rank.order.steps_per_epoch` steps per epoch, so DDP's collectives never wait on a rank that ran
    out of data.  Rank 0 writes ``model.pt`` (the ``state_dict``) and ``metrics.json`` in ``job.run_dir``, and
    ``checkpoint.pt`` (:class:`spark_mnist.rank.checkpoint.Checkpoint`) after every epoch, every
    ``checkpoint_every_steps`` steps and where ``max_steps`` stops the run.

    Resuming: with ``job.settings.resume`` (the driver decides, :mod:`spark_mnist.pipeline`) the run continues from
    ``checkpoint.pt`` (none there: it starts afresh, and rank 0 says so), on any world size whose ranks divide the
    checkpoint's global batch (the per-rank batch becomes global batch / world size; the loader's order makes the
    rest of the epoch exactly the samples not yet seen).  The ranks check the checkpoint again themselves.

    Args:
        job: the driver's :class:`spark_mnist.job.TrainJob`.
    Returns:
        The same dict on every rank (losses and counts are all-reduced): ``test_accuracy`` (float in [0, 1], the
        last epoch's; ``None`` when no epoch finished), ``epochs``, ``world_size``, ``steps_per_epoch``,
        ``batch_size`` (per rank), ``samples_per_epoch`` (all ranks), ``train_seconds`` and ``wall_seconds`` (s),
        ``device`` (``"cpu"``/``"cuda"``), ``loader``, ``model`` (its registry name), ``model_path``,
        ``resident_data`` (the training split was kept on the device, batches gathered there), ``channels_last``,
        ``compiled`` (the training step ran compiled: ``False`` after a fallback), and
        ``history``: per finished epoch ``epoch`` (from 1), ``train_loss`` and ``test_loss`` (mean cross-entropy,
        nats), ``test_accuracy``, ``test_samples``, ``samples_per_s``, ``data_wait_fraction`` (of the epoch's
        time, the share the device waited for batches, summed over ranks, in [0, 1]:
        :class:`spark_mnist.rank.step.DataWait`) and ``epoch_seconds`` (s).
    Model and checkpoint files hold CPU tensors (a plain ``torch.load`` works without a GPU).  Collectives time out
    after :data:`spark_mnist.rank.process.PROCESS_GROUP_TIMEOUT`; after an error the process group is aborted, not
    destroyed, so a rank never waits on peers that are gone.

    Raises:
        RuntimeError: ``use_gpu`` set where torch sees no CUDA device; the process group failing to form.
        EnvironmentMismatchError: ``use_gpu`` with ``LOCAL_RANK`` at or above the CUDA devices this rank sees.
        ValueError: an invalid rank environment (raised before a report can name the rank).
        InputError: an unknown model or dataset name; too few training rows for one batch on every rank (bad
            input: :mod:`spark_mnist.launch.restarts` does not relaunch it).
        CheckpointError: with ``resume``, a checkpoint that is unsafe or unreadable.
        LoaderStateError: with ``resume``, a checkpoint of another seed, dataset, row count or global batch, or a
            world size that does not divide its global batch.
        Any error of a rank after it read its environment (its device and the process group's set-up included)
        also leaves ``run_dir/_errors/rank-N.json`` for the driver (:func:`spark_mnist.runs.write_error_report`).
    Source: pytorch/examples ``mnist/main.py``; Spark's ``ml/torch/distributor.py`` (``TorchDistributor.run``).
    """
    world = World.from_env()
    started = time.perf_counter()
    try:
        torch.set_num_threads(threads_per_rank(job.settings.threads_per_rank, world.local_world_size))
        device = rank_device(job.settings.use_gpu, world.local_rank)
        init_process_group(device)
        result = _train(job, world, device, started)
        # Every rank's process ends together (rank 0 writes the outputs last), so that torch's elastic agents meet at
        # their exit barrier at once (launch/torch_distributor.py).
        dist.barrier()
    except BaseException as e:
        write_error_report(job.run_dir, world.rank, e)
        abort_process_group()
        raise
    # DDP lives in a reference cycle, with the process group: freed now, while the interpreter lives, not at its
    # teardown, where gloo's threads can abort the process (SIGABRT; pytorch/pytorch#179291) and fail the launch.
    gc.collect()
    dist.destroy_process_group()
    return result


def _resolve(setting: str, device: torch.device) -> bool:
    """An ``"auto"``/``"on"``/``"off"`` setting (train.resident_data, train.channels_last): ``"auto"`` is on with
    a GPU (``use_gpu``), off on the CPU."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def _setup(job: TrainJob, world: World, device: torch.device) -> tuple[_Run, Checkpoint | None]:
    """Seed, build the model, optimizer and step, and load the checkpoint to resume from (with the per-rank batch
    size that holds its global batch on this world size)."""
    settings = job.settings
    torch.manual_seed(settings.seed)
    channels_last = _resolve(settings.channels_last, device)
    model = build_model(settings.model, job.num_classes, job.image_shape).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub lacks it
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=settings.lr)
    step = TrainStep(ddp, optimizer, compile=settings.compile, bf16=settings.bf16, rank=world.rank)
    os.makedirs(job.run_dir, exist_ok=True)
    checkpoint = load_checkpoint(job.run_dir) if settings.resume else None
    if settings.resume and checkpoint is None:
        _say(world, f"resume: no checkpoint in {job.run_dir}, starting afresh")
    batch_size = settings.batch_size
    # On the checkpoint's own world size train.batch_size stays: the loader refuses another global batch.
    if checkpoint is not None and checkpoint.loader["world_size"] != world.world_size:
        batch_size = checkpoint.batch_size_for(world.world_size)
    norm = normalization_for(job.dataset)
    return _Run(job, world, device, model, optimizer, step, norm, channels_last, batch_size), checkpoint


def _resume(run: _Run, checkpoint: Checkpoint, train_loader: ShardLoader) -> None:
    """Restore the loader's position, the model and the optimizer from ``checkpoint``; a checkpoint the loader
    cannot honour raises :class:`~spark_mnist.errors.LoaderStateError` before anything is restored."""
    train_loader.load_state_dict(checkpoint.loader, source=checkpoint.source)
    run.model.load_state_dict(checkpoint.model)
    run.optimizer.load_state_dict(checkpoint.optimizer)
    saved = checkpoint.loader
    held = (
        f"; the global batch {saved['global_batch_size']} of its {saved['world_size']} ranks, {run.batch_size} per rank"
    )
    where = f"epoch {train_loader.epoch + 1}, step {train_loader.start_step}/{train_loader.steps_total}"
    same = saved["world_size"] == run.world.world_size
    _say(run.world, f"resume: continuing from {checkpoint.path} at {where}{'' if same else held}")


def _say(world: World, line: str) -> None:
    """Print ``line`` once, on rank 0 (the ranks' output is what the launcher shows)."""
    if world.is_leader:
        print(line, flush=True)


def _loaders(run: _Run) -> tuple[ShardLoader, ShardLoader]:
    """The training loader (shuffled, full steps only) and the evaluation loader (file order, every row)."""
    job = run.job
    common: dict[str, Any] = dict(
        rank=run.world.rank,
        world_size=run.world.world_size,
        batch_size=run.batch_size,
        image_shape=job.image_shape,
        seed=job.settings.seed,
        memory_budget_bytes=job.settings.memory_budget_mb * 2**20,  # MiB
        reader_threads=job.settings.reader_threads,
        pin_memory=run.device.type == "cuda",
        dataset=job.dataset_id,
    )
    # train.resident_data: the loaders keep their split on the training device (when it fits) and yield batches
    # there; petastorm reads the training batches itself, so only the evaluation loader then does.
    device = run.device if _resolve(job.settings.resident_data, run.device) else None
    train_device = device if job.settings.loader == "spark-mnist" else None
    return (
        ShardLoader(job.train_files, shuffle=True, drop_remainder=True, device=train_device, **common),
        ShardLoader(job.test_files, shuffle=False, drop_remainder=False, device=device, **common),
    )


def _train(job: TrainJob, world: World, device: torch.device, started: float) -> dict[str, Any]:
    run, checkpoint = _setup(job, world, device)
    settings = job.settings
    history: list[dict[str, Any]] = []
    train_loader, test_loader = _loaders(run)
    if checkpoint is not None:
        _resume(run, checkpoint, train_loader)
    with train_loader, test_loader:
        run.steps = train_loader.steps_total
        if run.steps == 0:
            raise InputError(
                f"{train_loader.total_rows} training rows cannot give every one of {world.world_size} "
                f"ranks a batch of {run.batch_size}"
            )
        while train_loader.epoch < settings.epochs:
            epoch = train_loader.epoch
            sums, stopped_at = _train_epoch(run, train_loader)
            if stopped_at is not None:  # stopped by max_steps mid-epoch: checkpoint there, end the run
                _checkpoint(run, train_loader.state_dict(epoch=epoch, step=stopped_at))
                break
            record = _epoch_record(run, epoch, sums, test_loader)
            history.append(record)
            train_loader.set_epoch(epoch + 1)
            _checkpoint(run, train_loader.state_dict())
            _say(
                world,
                f"epoch {record['epoch']}/{settings.epochs}: train loss {record['train_loss']:.4f}, "
                f"test accuracy {record['test_accuracy']:.4f} on {record['test_samples']} images, "
                f"{record['samples_per_s']:,.0f} samples/s, data wait {record['data_wait_fraction']:.1%}, "
                f"{record['epoch_seconds']:.1f}s",
            )
            if settings.max_steps and run.run_steps >= settings.max_steps:
                break
    model_path = os.path.join(job.run_dir, MODEL_NAME)
    # Every rank returns the same metrics: in local mode TorchDistributor keeps whichever rank's return value is
    # written last, not rank 0's.
    metrics = {
        "test_accuracy": history[-1]["test_accuracy"] if history else None,
        "epochs": settings.epochs,
        "world_size": world.world_size,
        "steps_per_epoch": run.steps,
        "batch_size": run.batch_size,
        "samples_per_epoch": run.steps * run.batch_size * world.world_size,
        "train_seconds": round(sum(h["epoch_seconds"] for h in history), 3),  # the slowest rank's, on every rank
        "wall_seconds": round(time.perf_counter() - started, 3),
        "device": device.type,
        "loader": settings.loader,
        "model": settings.model,
        "resident_data": train_loader.resident,
        "channels_last": run.channels_last,
        "compiled": run.step.compiled,
        "model_path": model_path,
        "history": history,
    }
    if world.is_leader:  # model.pt (its tensors on the CPU) and metrics.json, each written atomically
        with replacing(model_path) as tmp:
            torch.save(to_cpu(run.model.state_dict()), tmp)
        with replacing(os.path.join(job.run_dir, METRICS_NAME)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
    return metrics


def _batches(run: _Run, loader: ShardLoader) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    """The epoch's batches from ``loader``'s position: ``loader``'s, or petastorm's reader of the same steps.
    Closing it closes the reader."""
    if run.job.settings.loader == "spark-mnist":
        yield from loader
        return
    yield from petastorm_batches(
        run.job.train_converter,
        rank=run.world.rank,
        world_size=run.world.world_size,
        batch_size=run.batch_size,
        steps=run.steps - loader.start_step,
        image_shape=run.job.image_shape,
    )


def _train_epoch(run: _Run, loader: ShardLoader) -> tuple[torch.Tensor, int | None]:
    """Train from ``loader``'s position (epoch, start step) to the end of the epoch, or until ``max_steps``;
    checkpoint every ``checkpoint_every_steps`` steps and print progress (rank 0).  Returns this rank's sums, a
    float64 (4,) tensor on the device (training loss summed over samples, samples, seconds the device waited for
    data, seconds), and the step ``max_steps`` stopped the epoch at (``None``: it ran to its end)."""
    settings, epoch, first_step, cuda = run.job.settings, loader.epoch, loader.start_step, run.device.type == "cuda"
    run.step.ddp.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    samples, stopped_at, wait, epoch_start = 0, None, DataWait(run.device), time.perf_counter()
    progress_every = max(1, run.steps // PROGRESS_LINES_PER_EPOCH)
    with contextlib.closing(_batches(run, loader)) as batches:
        for step in range(first_step, run.steps):
            images, labels = wait.next(batches)
            loss = run.step(to_input(images, run.norm, run.channels_last), labels)
            loss_sum += loss.double() * len(labels)
            samples += len(labels)
            run.run_steps += 1
            more = step + 1 < run.steps
            if run.world.is_leader and (step + 1) % progress_every == 0 and more:
                if cuda:  # the steps queued so far count in the rate
                    torch.cuda.synchronize(run.device)
                done = (step + 1 - first_step) * loader.global_batch_size
                rate = f"{done / (time.perf_counter() - epoch_start):,.0f} samples/s"
                print(f"epoch {epoch + 1}/{settings.epochs}: step {step + 1}/{run.steps}, {rate}", flush=True)
            if settings.max_steps and run.run_steps == settings.max_steps and more:
                stopped_at = step + 1
                break
            if settings.checkpoint_every_steps and (step + 1) % settings.checkpoint_every_steps == 0 and more:
                _checkpoint(run, loader.state_dict(epoch=epoch, step=step + 1))
        if cuda:
            torch.cuda.synchronize(run.device)
        seconds = time.perf_counter() - epoch_start
    sums = torch.tensor([0.0, samples, wait.seconds(), seconds], dtype=torch.float64, device=run.device)
    sums[0] = loss_sum
    return sums, stopped_at


def _epoch_record(run: _Run, epoch: int, sums: torch.Tensor, test_loader: ShardLoader) -> dict[str, Any]:
    """The epoch's figures over all ranks from each rank's ``sums`` (:func:`_train_epoch`): training loss, data wait
    and seconds summed, the epoch's seconds the slowest rank's (so every rank reports the same ``epoch_seconds`` and
    ``samples_per_s``), then the evaluation."""
    device = run.device
    slowest = sums[3:].clone()
    dist.all_reduce(sums)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    loss_sum, samples, waited, busy = sums.tolist()
    seconds = max(1e-9, slowest.item())
    test_loss, correct, count = evaluate(run.model, test_loader, device, run.norm, channels_last=run.channels_last)
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(1.0, samples),
        "test_loss": test_loss / max(1, count),
        "test_accuracy": correct / max(1, count),
        "test_samples": count,
        "samples_per_s": samples / seconds,
        "data_wait_fraction": min(1.0, waited / max(1e-9, busy)),
        "epoch_seconds": seconds,
    }


def _checkpoint(run: _Run, loader_state: dict[str, Any]) -> None:
    """Rank 0 saves where the run stands: the model, the optimizer (their tensors copied to the CPU, so the file
    loads on a machine without a GPU) and the training loader's state."""
    if run.world.is_leader:
        model, optimizer = to_cpu(run.model.state_dict()), to_cpu(run.optimizer.state_dict())
        save_checkpoint(Checkpoint(model=model, optimizer=optimizer, loader=loader_state), run.job.run_dir)
