"""The per-rank DDP training loop: the function ``TorchDistributor`` runs in every rank.

Each rank reads its facts once (:class:`spark_mnist.rank.world.World`), joins the process group (``gloo`` on CPU,
``nccl`` on GPU with the device from ``LOCAL_RANK``), trains on its exact share of the training split
(:class:`spark_mnist.rank.loader.ShardLoader`), evaluates on its share of the full test split (counts summed over
ranks), and rank 0 prints per-epoch figures, checkpoints (:mod:`spark_mnist.rank.checkpoint`) and saves the model
``state_dict`` and the metrics in the run directory (:mod:`spark_mnist.runs`); drawing the curves is the caller's
(the metrics' ``history``).  One step, one epoch, the evaluation and the checkpoint are functions of their own, as
pytorch/examples ``mnist/main.py`` keeps ``train`` and ``test`` apart from ``main``; Spark's
``ml/torch/distributor.py`` docs give the environment.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from spark_mnist.errors import EnvironmentMismatchError, InputError, LoaderStateError
from spark_mnist.fs import replacing
from spark_mnist.job import TrainJob
from spark_mnist.models import Normalization, build_model, normalization_for, normalize
from spark_mnist.rank.checkpoint import Checkpoint, load_checkpoint, save_atomically, save_checkpoint
from spark_mnist.rank.loader import ShardLoader
from spark_mnist.rank.world import World
from spark_mnist.runs import METRICS_NAME, MODEL_NAME, write_error_report

__all__ = ["train_worker", "evaluate"]

log = logging.getLogger(__name__)

PROGRESS_LINES_PER_EPOCH = 4
# The longest a rank waits in one collective (or at the rendezvous of init_process_group) for the other ranks: a rank
# that died or hangs then fails the others with a timeout error instead of holding the job.  Far above any step,
# evaluation or checkpoint save of these models; torch's own default for nccl.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)
# train.resume values: resume from the checkpoint, refusing one this run cannot honour / resume when the checkpoint
# matches, else start afresh and say why / never resume.
RESUME_STRICT, RESUME_AUTO, RESUME_NEVER = (True, "always"), ("auto",), (False, None, "never")


@dataclass
class _Run:
    """One rank's training state: what the step, epoch and checkpoint functions share."""

    job: TrainJob
    world: World
    device: torch.device
    model: torch.nn.Module
    ddp: DistributedDataParallel
    optimizer: torch.optim.Optimizer
    norm: Normalization
    batch_size: int  # per rank: train.batch_size, or what holds a resumed checkpoint's global batch
    step_model: Any = None  # what the training step calls: ``ddp``, or ``torch.compile(ddp)`` with train.compile
    channels_last: bool = False  # model and input in channels_last (train.channels_last)
    compiled: bool = False  # step_model is compiled and has not (yet) fallen back
    first_compiled_step: bool = False  # the next step is the compiled model's first: a failure falls back
    resident: bool = False  # the training loader keeps its split on the device (train.resident_data)
    steps: int = 0  # steps per epoch, equal on every rank
    run_steps: int = 0  # steps this invocation ran (what train.max_steps counts)


@dataclass
class _EpochFigures:
    """This rank's figures of one training epoch; ``stopped_at`` is the step ``max_steps`` stopped it at."""

    loss_sum: torch.Tensor
    samples: int
    wait_seconds: float
    seconds: float
    stopped_at: int | None


def train_worker(job: TrainJob) -> dict[str, Any]:
    """Train in this rank; return the run's metrics.  Runs in every rank, started by ``TorchDistributor``.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` once (:meth:`World.from_env`), joins the
    process group and trains ``job.settings.model`` for ``job.settings.epochs`` epochs.  Every rank runs exactly
    :func:`spark_mnist.rank.order.steps_per_epoch` steps per epoch, so DDP's collectives never wait on a rank that ran
    out of data.  Rank 0 writes ``model.pt`` (the ``state_dict``) and ``metrics.json`` in ``job.run_dir``, and
    ``checkpoint.pt`` (:class:`spark_mnist.rank.checkpoint.Checkpoint`) after every epoch, every
    ``checkpoint_every_steps`` steps and where ``max_steps`` stops the run.

    Resuming (``train.resume``: ``True``/``"always"``, or ``"auto"``): the run continues from ``checkpoint.pt``, on
    any world size whose ranks divide the checkpoint's global batch (the per-rank batch becomes global batch / world
    size; the loader's order makes the rest of the epoch exactly the samples not yet seen).  A checkpoint of another
    seed, dataset or global batch is refused (``"auto"``: the run starts afresh instead, and rank 0 says why in one
    line).

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
        time spent waiting for batches, in [0, 1]) and ``epoch_seconds`` (s).
    Model and checkpoint files hold CPU tensors (a plain ``torch.load`` works without a GPU).  Collectives time out
    after :data:`PROCESS_GROUP_TIMEOUT`; after an error the process group is aborted, not destroyed, so a rank never
    waits on peers that are gone.

    Raises:
        RuntimeError: ``use_gpu`` set where torch sees no CUDA device; the process group failing to form.
        EnvironmentMismatchError: ``use_gpu`` with ``LOCAL_RANK`` at or above the CUDA devices this rank sees.
        ValueError: an invalid rank environment (raised before a report can name the rank).
        InputError: an unknown model or dataset name; too few training rows for one batch on every rank (bad
            input: :mod:`spark_mnist.launch.restarts` does not relaunch it).
        CheckpointError: with ``resume``, a checkpoint that is unsafe or unreadable.
        LoaderStateError: with ``resume`` (not ``"auto"``), a checkpoint of another seed, dataset, row count or
            global batch, or a world size that does not divide its global batch.
        Any error of a rank after it read its environment (its device and the process group's set-up included)
        also leaves ``run_dir/_errors/rank-N.json`` for the driver (:func:`spark_mnist.runs.write_error_report`).
    Source: pytorch/examples ``mnist/main.py``; Spark's ``ml/torch/distributor.py`` (``TorchDistributor.run``).
    """
    world = World.from_env()
    started = time.perf_counter()
    try:
        torch.set_num_threads(threads_per_rank(job.settings.threads_per_rank, world.local_world_size))
        device = _device(job.settings.use_gpu, world.local_rank)
        _init_process_group(device)
        result = _train(job, world, device, started)
        # Every rank's process ends together (rank 0 writes the outputs last), so that torch's elastic agents meet at
        # their exit barrier at once (launch/torch_distributor.py).
        dist.barrier()
    except BaseException as e:
        write_error_report(job.run_dir, world.rank, e)
        _abort_process_group()
        raise
    dist.destroy_process_group()
    return result


def threads_per_rank(setting: int, local_world_size: int) -> int:
    """Torch threads of one rank: ``setting`` (``train.threads_per_rank``) when set, else the cores this process may
    run on (its CPU affinity, else the machine's) divided among the ``local_world_size`` ranks on the node, at
    least 1."""
    if setting:
        return setting
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def _device(use_gpu: bool, local_rank: int) -> torch.device:
    """``cuda:local_rank`` (made the current device) with ``use_gpu``, else the CPU.

    The launchers give each rank its GPUs through ``CUDA_VISIBLE_DEVICES`` (TorchDistributor: the GPUs it picked on
    the driver, or the Spark task's), so ``LOCAL_RANK`` indexes the devices this process sees.

    Raises:
        RuntimeError: ``use_gpu`` where torch sees no CUDA device.
        EnvironmentMismatchError: ``LOCAL_RANK`` at or above the CUDA devices this process sees (more ranks on the
            node than GPUs).
    """
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("use_gpu is set but torch sees no CUDA device on this worker")
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise EnvironmentMismatchError(
            f"LOCAL_RANK {local_rank} has no GPU of its own: torch sees {visible} CUDA device(s) on this worker"
            f"{f' (CUDA_VISIBLE_DEVICES={shown})' if shown is not None else ''}; one GPU per rank: start at most "
            f"{visible} rank(s) per node (num_processes)"
        )
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def _init_process_group(device: torch.device) -> None:
    """Join the process group from torchrun's environment: ``nccl`` bound to ``device`` on a GPU, else ``gloo``;
    collectives time out after :data:`PROCESS_GROUP_TIMEOUT`."""
    if device.type == "cuda":
        # device_id binds the communicator to the rank's GPU at once (torch >= 2.3; the torch extra admits 2.1).
        bound: dict[str, Any] = (
            {"device_id": device} if "device_id" in inspect.signature(dist.init_process_group).parameters else {}
        )
        dist.init_process_group("nccl", timeout=PROCESS_GROUP_TIMEOUT, **bound)
    else:
        dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)


def _abort_process_group() -> None:
    """Tear the process group down after an error without waiting on collectives that will never complete (other
    ranks may be dead or stuck): ``destroy_process_group`` waits for them, aborting does not.  Never raises."""
    if not dist.is_initialized():
        return
    try:
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is not None:
            abort()
        # Without an abort (older torch) the group is left for the process's exit to release.
    except Exception:  # noqa: BLE001 - the rank's own error is what matters; its process ends next
        pass


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA kernels run asynchronously), so a clock read after it counts
    them; nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(
    model: torch.nn.Module,
    loader: ShardLoader,
    device: torch.device,
    norm: Normalization,
    *,
    channels_last: bool = False,
) -> tuple[float, int, int]:
    """Sum of cross-entropy (nats), correct predictions and samples over this rank's share of ``loader``'s split,
    summed over all ranks when a process group is up.  ``model.eval()`` under ``torch.no_grad()``, the loss summed
    with ``reduction="sum"``, as pytorch/examples ``mnist/main.py``'s ``test``; the input in ``channels_last``
    memory format with ``channels_last``.  Batches already on ``device`` (a resident loader) are not copied."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for images, labels in loader:
            x = _input(normalize(images.to(device, non_blocking=True), norm), channels_last)
            y = labels.to(device, non_blocking=True)
            logits = model(x)
            totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
            totals[1] += (logits.argmax(1) == y).sum()
            totals[2] += len(y)
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, correct, count = totals.tolist()
    return loss, int(correct), int(count)


def _setup(job: TrainJob, world: World, device: torch.device) -> tuple[_Run, Checkpoint | None]:
    """Seed, build the model and optimizer, and find the checkpoint to resume from (with the per-rank batch size
    that holds its global batch on this world size)."""
    settings = job.settings
    torch.manual_seed(settings.seed)
    norm = normalization_for(job.dataset)
    channels_last = _resolve(settings.channels_last, device)
    model = build_model(settings.model, job.num_classes, job.image_shape).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub lacks it
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=settings.lr)
    os.makedirs(job.run_dir, exist_ok=True)
    checkpoint, batch_size = _checkpoint_to_resume(job, world)
    run = _Run(job, world, device, model, ddp, optimizer, norm, batch_size, step_model=ddp, channels_last=channels_last)
    if settings.compile:
        try:
            run.step_model = torch.compile(ddp)
            run.compiled = run.first_compiled_step = True
        except Exception as e:  # noqa: BLE001 - compiling is an optimisation: say why and train uncompiled
            _compile_fell_back(run, e)
    return run, checkpoint


def _resolve(setting: str, device: torch.device) -> bool:
    """An ``"auto"``/``"on"``/``"off"`` setting (train.resident_data, train.channels_last): ``"auto"`` is on with
    a GPU (``use_gpu``), off on the CPU."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def _compile_fell_back(run: _Run, error: BaseException) -> None:
    """Train uncompiled from now on, and say why in one warning line."""
    run.step_model, run.compiled, run.first_compiled_step = run.ddp, False, False
    first = (str(error).strip().splitlines() or [""])[0]
    log.warning(
        "rank %d: torch.compile failed, training uncompiled: %s: %s", run.world.rank, type(error).__name__, first
    )


def _input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The normalised batch as the model takes it: in ``channels_last`` memory format when asked."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _checkpoint_to_resume(job: TrainJob, world: World) -> tuple[Checkpoint | None, int]:
    """The checkpoint ``train.resume`` asks for, and the per-rank batch size this run uses: ``train.batch_size``,
    or on another world size than the checkpoint's, what holds its global batch."""
    settings = job.settings
    mode = settings.resume
    if mode in RESUME_NEVER:
        return None, settings.batch_size
    if mode not in RESUME_STRICT + RESUME_AUTO:
        raise ValueError(f"Invalid train.resume: {mode!r}. Must be one of True, False, 'always', 'auto', 'never'.")
    checkpoint = load_checkpoint(job.run_dir)
    if checkpoint is None:
        _say(world, f"resume: no checkpoint in {job.run_dir}, starting afresh")
        return None, settings.batch_size
    if checkpoint.loader["world_size"] == world.world_size:  # a changed batch size is another global batch: refused
        return checkpoint, settings.batch_size
    try:
        batch_size = checkpoint.batch_size_for(world.world_size)
    except LoaderStateError as e:
        if mode in RESUME_STRICT:
            raise
        _say(world, f"resume: auto: starting afresh: {e}")
        return None, settings.batch_size
    return checkpoint, batch_size


def _resume(run: _Run, checkpoint: Checkpoint | None, train_loader: ShardLoader) -> bool:
    """Restore the loader's position, the model and the optimizer from ``checkpoint``; ``False`` when there is none
    to resume from (the loader stays at the start of epoch 0)."""
    if checkpoint is None:
        return False
    try:
        checkpoint.resume(train_loader)
    except LoaderStateError as e:
        if run.job.settings.resume in RESUME_STRICT:
            raise
        _say(run.world, f"resume: auto: starting afresh: {e}")
        return False
    run.model.load_state_dict(checkpoint.model)
    run.optimizer.load_state_dict(checkpoint.optimizer)
    written = checkpoint.loader["world_size"]
    held = (
        f"; written by {written} ranks, batch size {run.batch_size} per rank holds its global batch "
        f"{checkpoint.loader['global_batch_size']}"
        if written != run.world.world_size
        else ""
    )
    _say(
        run.world,
        f"resume: continuing from {checkpoint.path} at epoch {train_loader.epoch + 1}, step "
        f"{train_loader.start_step}/{train_loader.steps_total}{held}",
    )
    return True


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
        memory_budget_bytes=job.memory_budget_bytes,
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
    history: list[dict[str, Any]] = []
    train_seconds = 0.0
    train_loader, test_loader = _loaders(run)
    if not _resume(run, checkpoint, train_loader) and run.batch_size != job.settings.batch_size:
        run.batch_size = job.settings.batch_size  # "auto" refused a checkpoint of another world size: start afresh
        train_loader, test_loader = _loaders(run)
    run.resident = train_loader.resident
    with train_loader, test_loader:
        run.steps = train_loader.steps_total
        if run.steps == 0:
            raise InputError(
                f"{train_loader.total_rows} training rows cannot give every one of {world.world_size} "
                f"ranks a batch of {run.batch_size}"
            )
        while train_loader.epoch < job.settings.epochs:
            epoch = train_loader.epoch
            figures = _train_epoch(run, train_loader)
            if figures.stopped_at is not None:  # stopped by max_steps mid-epoch: checkpoint there, end the run
                _checkpoint(run, train_loader.state_dict(epoch=epoch, step=figures.stopped_at))
                break
            record = _epoch_record(run, epoch, figures, test_loader)
            train_seconds += record["epoch_seconds"]  # the slowest rank's: the same on every rank
            history.append(record)
            train_loader.set_epoch(epoch + 1)
            _checkpoint(run, train_loader.state_dict())
            _print_epoch(run, record)
            if job.settings.max_steps and run.run_steps >= job.settings.max_steps:
                break
    metrics = _metrics(run, history, train_seconds, time.perf_counter() - started)
    if world.is_leader:
        _write_outputs(run, metrics)
    # Every rank returns the same metrics: in local mode TorchDistributor keeps whichever rank's return value is
    # written last, not rank 0's.
    return metrics


def _batches(run: _Run, loader: ShardLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's batches from ``loader``'s position: ``loader`` itself, or petastorm's reader of the same steps."""
    settings = run.job.settings
    if settings.loader == "spark-mnist":
        return iter(loader)
    from spark_mnist.rank.petastorm import petastorm_batches

    return petastorm_batches(
        run.job.train_converter,
        rank=run.world.rank,
        world_size=run.world.world_size,
        batch_size=run.batch_size,
        steps=run.steps - loader.start_step,
        image_shape=run.job.image_shape,
    )


def _train_step(run: _Run, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One optimiser step on a uint8 (B, 1, H, W) batch with int64 (B,) labels (copied to the device unless a
    resident loader yielded them there); returns the batch's mean loss.  The first step of a compiled model that
    fails falls back to the uncompiled one (:func:`_compile_fell_back`) and is run again."""
    x = _input(normalize(images.to(run.device, non_blocking=True), run.norm), run.channels_last)
    y = labels.to(run.device, non_blocking=True)
    run.optimizer.zero_grad(set_to_none=True)
    if run.first_compiled_step:
        try:
            loss = _forward_backward(run, x, y)
        except Exception as e:  # noqa: BLE001 - compiling is an optimisation: say why and train uncompiled
            _compile_fell_back(run, e)
            run.optimizer.zero_grad(set_to_none=True)
            loss = _forward_backward(run, x, y)
        run.first_compiled_step = False
    else:
        loss = _forward_backward(run, x, y)
    run.optimizer.step()
    return loss.detach()


def _forward_backward(run: _Run, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.job.settings.bf16):
        loss = F.cross_entropy(run.step_model(x), y)
    loss.backward()
    return loss


def _train_epoch(run: _Run, loader: ShardLoader) -> _EpochFigures:
    """Train from ``loader``'s position (epoch, start step) to the end of the epoch, or until ``max_steps``;
    checkpoint every ``checkpoint_every_steps`` steps and print progress (rank 0)."""
    settings, epoch, first_step = run.job.settings, loader.epoch, loader.start_step
    run.ddp.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    samples, wait, stopped_at, epoch_start = 0, 0.0, None, time.perf_counter()
    progress_every = max(1, run.steps // PROGRESS_LINES_PER_EPOCH)
    with contextlib.closing(_batches(run, loader)) as batches:  # type: ignore[type-var]  # generators: they close
        for step in range(first_step, run.steps):
            t = time.perf_counter()
            images, labels = next(batches)
            wait += time.perf_counter() - t
            loss = _train_step(run, images, labels)
            loss_sum += loss.double() * len(labels)
            samples += len(labels)
            run.run_steps += 1
            more = step + 1 < run.steps
            if run.world.is_leader and (step + 1) % progress_every == 0 and more:
                _synchronize(run.device)
                done = (step + 1 - first_step) * loader.global_batch_size
                print(
                    f"epoch {epoch + 1}/{settings.epochs}: step {step + 1}/{run.steps}, "
                    f"{done / (time.perf_counter() - epoch_start):,.0f} samples/s",
                    flush=True,
                )
            if settings.max_steps and run.run_steps == settings.max_steps and more:
                stopped_at = step + 1
                break
            if settings.checkpoint_every_steps and (step + 1) % settings.checkpoint_every_steps == 0 and more:
                _checkpoint(run, loader.state_dict(epoch=epoch, step=step + 1))
        _synchronize(run.device)
        seconds = time.perf_counter() - epoch_start
    return _EpochFigures(loss_sum, samples, wait, seconds, stopped_at)


def _epoch_record(run: _Run, epoch: int, figures: _EpochFigures, test_loader: ShardLoader) -> dict[str, Any]:
    """The epoch's figures over all ranks: training loss and data wait summed, the epoch's seconds the slowest
    rank's (so every rank reports the same ``epoch_seconds`` and ``samples_per_s``), then the evaluation."""
    device = run.device
    totals = torch.stack([figures.loss_sum, torch.tensor(float(figures.samples), dtype=torch.float64, device=device)])
    dist.all_reduce(totals)
    waits = torch.tensor([figures.wait_seconds, figures.seconds], dtype=torch.float64, device=device)
    dist.all_reduce(waits)
    slowest = torch.tensor([figures.seconds], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    seconds = max(1e-9, slowest.item())
    test_loss, correct, count = evaluate(run.model, test_loader, device, run.norm, channels_last=run.channels_last)
    return {
        "epoch": epoch + 1,
        "train_loss": totals[0].item() / max(1.0, totals[1].item()),
        "test_loss": test_loss / max(1, count),
        "test_accuracy": correct / max(1, count),
        "test_samples": count,
        "samples_per_s": totals[1].item() / seconds,
        "data_wait_fraction": waits[0].item() / max(1e-9, waits[1].item()),
        "epoch_seconds": seconds,
    }


def _print_epoch(run: _Run, record: dict[str, Any]) -> None:
    if run.world.is_leader:
        print(
            f"epoch {record['epoch']}/{run.job.settings.epochs}: train loss {record['train_loss']:.4f}, "
            f"test accuracy {record['test_accuracy']:.4f} on {record['test_samples']} images, "
            f"{record['samples_per_s']:,.0f} samples/s, data wait {record['data_wait_fraction']:.1%}, "
            f"{record['epoch_seconds']:.1f}s",
            flush=True,
        )


def _checkpoint(run: _Run, loader_state: dict[str, Any]) -> None:
    """Rank 0 saves where the run stands: the model, the optimizer (their tensors copied to the CPU, so the file
    loads on a machine without a GPU) and the training loader's state."""
    if run.world.is_leader:
        save_checkpoint(
            Checkpoint(
                model=to_cpu(run.model.state_dict()), optimizer=to_cpu(run.optimizer.state_dict()), loader=loader_state
            ),
            run.job.run_dir,
        )


def to_cpu(state: Any) -> Any:
    """``state`` (a ``state_dict``: nested dicts, lists and tuples of tensors and plain values) with every tensor
    on the CPU, detached; CPU tensors are not copied.  What is saved, so that a plain ``torch.load`` of the file
    works where there is no GPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return type(state)((k, to_cpu(v)) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return state


def _metrics(run: _Run, history: list[dict[str, Any]], train_seconds: float, wall_seconds: float) -> dict[str, Any]:
    settings, world_size = run.job.settings, run.world.world_size
    last = history[-1] if history else {}
    return {
        "test_accuracy": last.get("test_accuracy"),
        "epochs": settings.epochs,
        "world_size": world_size,
        "steps_per_epoch": run.steps,
        "batch_size": run.batch_size,
        "samples_per_epoch": run.steps * run.batch_size * world_size,
        "train_seconds": round(train_seconds, 3),
        "wall_seconds": round(wall_seconds, 3),
        "device": run.device.type,
        "loader": settings.loader,
        "model": settings.model,
        "resident_data": run.resident,
        "channels_last": run.channels_last,
        "compiled": run.compiled,
        "model_path": os.path.join(run.job.run_dir, MODEL_NAME),
        "history": history,
    }


def _write_outputs(run: _Run, metrics: dict[str, Any]) -> None:
    """Rank 0: ``model.pt`` (the module's ``state_dict``, its tensors on the CPU) and ``metrics.json``, each written
    atomically."""
    run_dir = run.job.run_dir
    save_atomically(to_cpu(run.model.state_dict()), os.path.join(run_dir, MODEL_NAME))
    with replacing(os.path.join(run_dir, METRICS_NAME)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
