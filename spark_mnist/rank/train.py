"""The per-rank DDP training loop: the function ``TorchDistributor`` runs in every rank.

Each rank reads its facts once (:class:`spark_mnist.rank.world.World`), sets its torch threads and its device
(:mod:`spark_mnist.rank.device`), joins the process group from torchrun's environment (Spark's
``ml/torch/distributor.py`` docs give it), trains on its exact share of the training split
(:class:`spark_mnist.rank.loader.ShardLoader`) one optimiser step at a time (``_Run.train_step``, fetching each batch
through :class:`~spark_mnist.rank.device.DataWait`), evaluates on its share of the full test split
(``_Run.evaluate``, counts summed over ranks), and rank 0 prints per-epoch figures, checkpoints
(:mod:`spark_mnist.rank.checkpoint`) and saves the model ``state_dict`` and the metrics in the run directory
(:mod:`spark_mnist.runs`); drawing the curves is the caller's (the metrics' ``history``).  As pytorch/examples
``mnist/main.py``, the step and the evaluation are short functions apart from the loop.
"""

import contextlib
import gc
import inspect
import json
import logging
import os
import time
from typing import Any, Generator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from spark_mnist.errors import InputError
from spark_mnist.fs import replacing
from spark_mnist.job import TrainJob
from spark_mnist.models import build_model, normalization_for, normalize
from spark_mnist.rank.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, to_cpu
from spark_mnist.rank.device import PROCESS_GROUP_TIMEOUT, DataWait, rank_device, resolve, threads_per_rank
from spark_mnist.rank.loader import ShardLoader
from spark_mnist.rank.petastorm import petastorm_batches
from spark_mnist.rank.world import World
from spark_mnist.runs import METRICS_NAME, MODEL_NAME, write_error_report

__all__ = ["PROGRESS_LINES_PER_EPOCH", "train_worker"]

log = logging.getLogger(__name__)

PROGRESS_LINES_PER_EPOCH = 4


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
        :class:`~spark_mnist.rank.device.DataWait`) and ``epoch_seconds`` (s).
    Model and checkpoint files hold CPU tensors (a plain ``torch.load`` works without a GPU).  Collectives time out
    after :data:`PROCESS_GROUP_TIMEOUT`; after an error the process group is aborted, not
    destroyed, so a rank never waits on peers that are gone.

    Raises:
        RuntimeError: ``use_gpu`` set where torch sees no CUDA device; the process group failing to form.
        EnvironmentMismatchError: ``use_gpu`` with ``LOCAL_RANK`` at or above the CUDA devices this rank sees.
        ValueError: an invalid rank environment (raised before a report can name the rank).
        InputError: an unknown model or dataset name; too few training rows for one batch on every rank (bad
            input: :func:`spark_mnist.launch.run_with_restarts` does not relaunch it).
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
        # Join the group from torchrun's environment: nccl on a GPU, else gloo; collectives time out after
        # PROCESS_GROUP_TIMEOUT.  device_id binds the communicator to the rank's GPU at once (torch >= 2.3; the torch
        # extra admits 2.1).
        bound: dict[str, Any] = {}
        if device.type == "cuda" and "device_id" in inspect.signature(dist.init_process_group).parameters:
            bound["device_id"] = device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT, **bound)
        result = _train(job, world, device, started)
        # Every rank's process ends together (rank 0 writes the outputs last), so that torch's elastic agents meet at
        # their exit barrier at once (launch/torch_distributor.py).
        dist.barrier()
    except BaseException as e:
        write_error_report(job.run_dir, world.rank, e)
        # Abort the group, without waiting on collectives that will never complete (other ranks may be dead or
        # stuck): destroy_process_group waits for them.  Without an abort (older torch: AttributeError) the group is
        # left for the process's exit to release.
        with contextlib.suppress(Exception):  # the rank's own error is what matters; its process ends next
            if dist.is_initialized():
                dist.distributed_c10d._abort_process_group()
        raise
    # DDP lives in a reference cycle, with the process group: freed now, while the interpreter lives, not at its
    # teardown, where gloo's threads can abort the process (SIGABRT; pytorch/pytorch#179291) and fail the launch.
    gc.collect()
    dist.destroy_process_group()
    return result


class _Run:
    """One rank's training state (its model, optimizer, step and loaders) and what a step and an epoch do with it.

    A step (:meth:`train_step`) is one optimiser step of the DDP model: cross-entropy, under bfloat16 autocast with
    ``train.bf16``.  With ``train.compile`` it runs ``torch.compile`` of the DDP model, compiled in this invocation's
    first step; where compiling fails, in ``torch.compile`` or in the compiled model's first step (as where inductor
    finds no C compiler), it says why in one warning line and runs uncompiled from then on (that first step again).

    Attributes:
        model: the module, not the DDP wrapper (what is saved); ddp: the wrapper.
        forward: what a step runs: ``torch.compile(ddp)``, or ``ddp``.
        compiled: the step runs compiled (``False`` after a fallback).
        channels_last: model and input in channels_last (train.channels_last).
        batch_size: per rank: train.batch_size, or what holds a resumed checkpoint's global batch.
        steps: steps per epoch, equal on every rank.
        run_steps: steps this invocation ran (what train.max_steps counts).
    """

    def __init__(self, job: TrainJob, world: World, device: torch.device):
        """Seed, build the model, optimizer and loaders, and resume from the checkpoint (with the per-rank
        batch size that holds its global batch on this world size; one the loader cannot honour raises
        :class:`~spark_mnist.errors.LoaderStateError` before anything is restored)."""
        self.job, self.world, self.device = job, world, device
        settings = self.settings = job.settings
        torch.manual_seed(settings.seed)
        self.channels_last = resolve(settings.channels_last, device)
        self.model = build_model(settings.model, job.num_classes, job.image_shape).to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub lacks it
        self.ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.Adam(self.ddp.parameters(), lr=settings.lr)
        self.forward: Any = self.ddp
        self.compiled = settings.compile  # compiled in the first step, where a failure falls back (train_step)
        self.norm = normalization_for(job.dataset)
        self.run_steps = 0
        os.makedirs(job.run_dir, exist_ok=True)
        checkpoint = load_checkpoint(job.run_dir) if settings.resume else None
        if settings.resume and checkpoint is None:
            self.say(f"resume: no checkpoint in {job.run_dir}, starting afresh")
        # On the checkpoint's own world size train.batch_size stays: the loader refuses another global batch.
        elastic = checkpoint is not None and checkpoint.loader["world_size"] != world.world_size
        self.batch_size = checkpoint.batch_size_for(world.world_size) if checkpoint and elastic else settings.batch_size
        # train.resident_data: the loaders keep their split on the training device (when it fits) and yield batches
        # there; petastorm reads the training batches itself, so only the evaluation loader then does.
        resident = device if resolve(settings.resident_data, device) else None
        shared: dict[str, Any] = dict(  # what the two loaders share
            rank=world.rank,
            world_size=world.world_size,
            batch_size=self.batch_size,
            image_shape=job.image_shape,
            seed=settings.seed,
            memory_budget_bytes=settings.memory_budget_mb * 2**20,  # MiB
            reader_threads=settings.reader_threads,
            pin_memory=device.type == "cuda",
            dataset=job.dataset_id,
        )
        # The training loader (shuffled, full steps only: ShardLoader's defaults) and the evaluation loader (file
        # order, every row).
        train_device = resident if settings.loader == "spark-mnist" else None
        self.train_loader = ShardLoader(job.train_files, device=train_device, **shared)
        self.test_loader = ShardLoader(job.test_files, shuffle=False, drop_remainder=False, device=resident, **shared)
        self.steps = self.train_loader.steps_total
        if checkpoint is not None:
            self.train_loader.load_state_dict(checkpoint.loader, source=checkpoint.source)
            self.model.load_state_dict(checkpoint.model)
            self.optimizer.load_state_dict(checkpoint.optimizer)
            saved, loader = checkpoint.loader, self.train_loader
            where = f"epoch {loader.epoch + 1}, step {loader.start_step}/{self.steps}"
            if elastic:
                where += f"; the global batch {saved['global_batch_size']} of its {saved['world_size']} ranks, "
                where += f"{self.batch_size} per rank"
            self.say(f"resume: continuing from {checkpoint.source} at {where}")

    def say(self, line: str) -> None:
        """Print ``line`` once, on rank 0 (the ranks' output is what the launcher shows)."""
        if self.world.is_leader:
            print(line, flush=True)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimiser step on uint8 (B, 1, H, W) ``images`` and int64 (B,) ``labels``, both on the device;
        returns the batch's mean loss (detached, a 0-d tensor on the device)."""
        x = normalize(images, self.norm, self.channels_last)
        try:
            if self.compiled and self.run_steps == 0:
                self.forward = torch.compile(self.ddp)
            loss = self._forward_backward(x, labels)
        except Exception as e:
            if not (self.compiled and self.run_steps == 0):  # only the compiling first step falls back
                raise
            self.forward, self.compiled = self.ddp, False  # say why in one line, and run uncompiled from now on
            line, name = (str(e).strip().splitlines() or [""])[0], type(e).__name__
            log.warning("rank %d: torch.compile failed, training uncompiled: %s: %s", self.world.rank, name, line)
            loss = self._forward_backward(x, labels)
        self.optimizer.step()
        return loss.detach()

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.settings.bf16):
            loss = F.cross_entropy(self.forward(x), y)
        loss.backward()
        return loss

    def evaluate(self) -> torch.Tensor:
        """This rank's sums over its share of the test split (uint8 (B, 1, H, W) images, int64 (B,) labels):
        cross-entropy (nats), correct predictions and samples, float64 (3,) on the device.  ``model.eval()`` under
        ``torch.no_grad()``, the loss summed with ``reduction="sum"``, as pytorch/examples ``mnist/main.py``'s
        ``test``.  Batches already on the device (a resident loader) are not copied."""
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for images, labels in self.test_loader:
                y = labels.to(self.device, non_blocking=True)
                logits = self.model(normalize(images.to(self.device, non_blocking=True), self.norm, self.channels_last))
                totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
                totals[1] += (logits.argmax(1) == y).sum()
                totals[2] += len(y)
        return totals

    def batches(self) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        """The epoch's batches from the training loader's position: its own, or petastorm's reader of the same
        steps.  Closing it closes the reader."""
        if self.settings.loader == "spark-mnist":
            return iter(self.train_loader)
        return petastorm_batches(
            self.job.train_converter,
            world=self.world,
            batch_size=self.batch_size,
            steps=self.steps - self.train_loader.start_step,
            image_shape=self.job.image_shape,
        )

    def train_epoch(self) -> dict[str, Any] | None:
        """Train from the training loader's position (epoch, start step) to the end of the epoch, then evaluate;
        checkpoint every ``checkpoint_every_steps`` steps and print progress (rank 0); at the epoch's end, set the
        loader to the next epoch, checkpoint there and print the epoch's figures (rank 0).  Returns the epoch's
        figures over all ranks: training loss, data wait and seconds summed, the epoch's seconds the slowest rank's
        (so every rank reports the same ``epoch_seconds`` and ``samples_per_s``), then the evaluation; ``None`` where
        ``max_steps`` stopped the epoch (checkpointed there)."""
        loader, settings, cuda = self.train_loader, self.settings, self.device.type == "cuda"
        epoch, first_step = loader.epoch, loader.start_step
        self.ddp.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        wait, epoch_start = DataWait(self.device), time.perf_counter()
        progress_every = max(1, self.steps // PROGRESS_LINES_PER_EPOCH)
        with contextlib.closing(self.batches()) as batches:
            for done in range(first_step + 1, self.steps + 1):  # done: the epoch's steps run once this one is
                images, labels = wait.next(batches)
                loss_sum += self.train_step(images, labels).double() * len(labels)
                self.run_steps += 1
                more = done < self.steps
                if self.world.is_leader and done % progress_every == 0 and more:
                    if cuda:  # the steps queued so far count in the rate
                        torch.cuda.synchronize(self.device)
                    rate = (done - first_step) * loader.global_batch_size / (time.perf_counter() - epoch_start)
                    self.say(f"epoch {epoch + 1}/{settings.epochs}: step {done}/{self.steps}, {rate:,.0f} samples/s")
                stop = settings.max_steps and self.run_steps == settings.max_steps
                every = settings.checkpoint_every_steps
                if more and (stop or (every and done % every == 0)):
                    self.checkpoint(loader.state_dict(epoch=epoch, step=done))
                    if stop:
                        return None
            if cuda:
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - epoch_start
        # Summed over the ranks: the training loss, the data wait, the seconds and the evaluation; the seconds also
        # the slowest rank's.  Every batch is full: the epoch's samples over all ranks follow from its steps.
        times = torch.tensor([wait.seconds(), seconds], dtype=torch.float64, device=self.device)
        sums = torch.cat([loss_sum.view(1), times, self.evaluate()])
        dist.all_reduce(sums)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        loss_sum, waited, busy, test_loss, correct, count = sums.tolist()
        seconds, samples = max(1e-9, times[1].item()), (self.steps - first_step) * loader.global_batch_size
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, samples),
            "test_loss": test_loss / max(1.0, count),
            "test_accuracy": correct / max(1.0, count),
            "test_samples": int(count),
            "samples_per_s": samples / seconds,
            "data_wait_fraction": min(1.0, waited / max(1e-9, busy)),
            "epoch_seconds": seconds,
        }
        loader.set_epoch(epoch + 1)
        self.checkpoint(loader.state_dict())
        self.say(
            "epoch {epoch}/{epochs}: train loss {train_loss:.4f}, test accuracy {test_accuracy:.4f} on "
            "{test_samples} images, {samples_per_s:,.0f} samples/s, data wait {data_wait_fraction:.1%}, "
            "{epoch_seconds:.1f}s".format(epochs=settings.epochs, **record)
        )
        return record

    def checkpoint(self, loader_state: dict[str, Any]) -> None:
        """Rank 0 saves where the run stands: the model, the optimizer (their tensors copied to the CPU, so the file
        loads on a machine without a GPU) and the training loader's state."""
        if self.world.is_leader:
            model, optimizer = to_cpu(self.model.state_dict()), to_cpu(self.optimizer.state_dict())
            save_checkpoint(Checkpoint(model=model, optimizer=optimizer, loader=loader_state), self.job.run_dir)


def _train(job: TrainJob, world: World, device: torch.device, started: float) -> dict[str, Any]:
    run, settings = _Run(job, world, device), job.settings
    history: list[dict[str, Any]] = []
    with run.train_loader as loader, run.test_loader:
        if run.steps == 0:
            raise InputError(
                f"{loader.total_rows} training rows cannot give every one of {world.world_size} "
                f"ranks a batch of {run.batch_size}"
            )
        # None: stopped by max_steps mid-epoch, checkpointed there: the run ends.
        while loader.epoch < settings.epochs and (record := run.train_epoch()) is not None:
            history.append(record)
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
        "resident_data": loader.resident,
        "channels_last": run.channels_last,
        "compiled": run.compiled,
        "model_path": model_path,
        "history": history,
    }
    if world.is_leader:  # model.pt (its tensors on the CPU) and metrics.json, each written atomically
        with replacing(model_path) as tmp:
            torch.save(to_cpu(run.model.state_dict()), tmp)
        with replacing(os.path.join(job.run_dir, METRICS_NAME)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
    return metrics
