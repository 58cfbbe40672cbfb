"""The per-rank DDP training loop: the function ``TorchDistributor`` runs in every rank.

Each rank reads its facts from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), joins the process
group (``gloo`` on CPU, ``nccl`` on GPU with the device from ``LOCAL_RANK``), trains on its exact share of the
training split (:class:`spark_mnist.rank.loader.ShardLoader`), evaluates on its share of the full test split (counts
summed over ranks), and rank 0 prints per-epoch figures, checkpoints and saves the model ``state_dict``.
Pattern: pytorch/examples ``mnist/main.py`` and Spark's ``ml/torch/distributor.py`` docs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from spark_mnist.rank.loader import ShardLoader, petastorm_batches, worker_env
from spark_mnist.models import Normalization, SimpleCNN, normalization_for, normalize

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
METRICS_NAME = "metrics.json"
CURVES_NAME = "curves.png"
PROGRESS_LINES_PER_EPOCH = 4


@dataclass
class TrainJob:
    """Everything a rank needs, picklable: file lists, hyper-parameters and where to write.

    ``train_files``/``test_files`` are local paths or ``file:``/``dbfs:`` URLs of the Parquet shards (petastorm's
    converter cache).  ``run_dir`` receives ``model.pt``, ``checkpoint.pt`` and ``metrics.json`` (rank 0).
    ``max_steps`` (0: no limit) ends this run after that many steps, checkpointing where it stopped, so a later
    ``resume`` continues mid-epoch.
    """

    train_files: list[str]
    test_files: list[str]
    dataset: str
    run_dir: str
    num_classes: int = 10
    image_shape: tuple[int, int] = (28, 28)
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    use_gpu: bool = False
    bf16: bool = False
    resume: bool = False
    checkpoint_every_steps: int = 0
    max_steps: int = 0
    loader: str = "spark-mnist"
    memory_budget_bytes: int = 2 * 2**30
    reader_threads: int = 2
    threads_per_rank: int = 0
    train_converter: Any = field(default=None, repr=False)


def _device(job: TrainJob, local_rank: int) -> torch.device:
    if job.use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("use_gpu is set but torch sees no CUDA device on this worker")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def save_atomically(obj: Any, path: str) -> None:
    """``torch.save`` through a temporary name and a rename, so ``path`` is always complete."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(run_dir: str, job: TrainJob) -> dict[str, Any] | None:
    """The checkpoint in ``run_dir``, or ``None``.  Raises ``ValueError`` when it was written with another world
    size or batch size, since resuming mid-epoch depends on both."""
    path = os.path.join(run_dir, CHECKPOINT_NAME)
    if not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if (state["world_size"], state["batch_size"]) != (world_size, job.batch_size):
        raise ValueError(f"{path}: written with world size {state['world_size']} and batch size "
                         f"{state['batch_size']}; this run has {world_size} and {job.batch_size}")
    return state


def evaluate(model: torch.nn.Module, loader: ShardLoader, device: torch.device, norm: Normalization
             ) -> tuple[float, int, int]:
    """Sum of cross-entropy, correct predictions and samples over this rank's share, summed over all ranks."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for images, labels in loader:
            x = normalize(images.to(device, non_blocking=True), norm)
            y = labels.to(device, non_blocking=True)
            logits = model(x)
            totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
            totals[1] += (logits.argmax(1) == y).sum()
            totals[2] += len(y)
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, correct, count = totals.tolist()
    return loss, int(correct), int(count)


def train_worker(job: TrainJob) -> dict[str, Any]:
    """Train in this rank; return the run's metrics (the same on every rank: losses and counts are all-reduced).

    Every rank runs exactly :func:`spark_mnist.rank.loader.steps_per_epoch` steps per epoch, so DDP's collectives never
    wait on a rank that ran out of data.
    """
    rank, world_size, local_rank = worker_env()
    device = _device(job, local_rank)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    torch.set_num_threads(job.threads_per_rank or max(1, (os.cpu_count() or 1) // local_world))
    started = time.perf_counter()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(job, rank, world_size, device, started)
    except BaseException as e:
        write_error_report(job.run_dir, rank, e)
        raise
    finally:
        dist.destroy_process_group()


ERRORS_DIR = "_errors"


def write_error_report(run_dir: str, rank: int, error: BaseException) -> None:
    """Leave ``run_dir/_errors/rank-N.json`` (rank, exception, traceback) for the driver to report."""
    import traceback

    try:
        os.makedirs(os.path.join(run_dir, ERRORS_DIR), exist_ok=True)
        report = {"rank": rank, "exception": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exception(error)[-12:]}
        with open(os.path.join(run_dir, ERRORS_DIR, f"rank-{rank}.json"), "w", encoding="utf-8") as f:
            json.dump(report, f)
    except OSError:
        pass  # the original error matters more than the report


def read_error_reports(run_dir: str) -> list[dict[str, Any]]:
    """The reports :func:`write_error_report` left, by rank."""
    directory = os.path.join(run_dir, ERRORS_DIR)
    if not os.path.isdir(directory):
        return []
    reports = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            reports.append(json.load(f))
    return reports


def clear_error_reports(run_dir: str) -> None:
    """Remove earlier runs' reports before a new run."""
    import shutil

    shutil.rmtree(os.path.join(run_dir, ERRORS_DIR), ignore_errors=True)


def _train(job: TrainJob, rank: int, world_size: int, device: torch.device, started: float) -> dict[str, Any]:
    torch.manual_seed(job.seed)
    norm = normalization_for(job.dataset)
    model = SimpleCNN(job.num_classes, job.image_shape).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=job.lr)
    os.makedirs(job.run_dir, exist_ok=True)
    start_epoch, start_step = 0, 0
    state = load_checkpoint(job.run_dir, job) if job.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_step = state["epoch"], state["step"]
    pin = device.type == "cuda"
    common = dict(rank=rank, world_size=world_size, batch_size=job.batch_size, image_shape=job.image_shape,
                  seed=job.seed, memory_budget_bytes=job.memory_budget_bytes, reader_threads=job.reader_threads,
                  pin_memory=pin)
    history: list[dict[str, Any]] = []
    train_seconds = 0.0
    run_steps = 0
    with ShardLoader(job.train_files, shuffle=True, drop_remainder=True, **common) as train_loader, \
            ShardLoader(job.test_files, shuffle=False, drop_remainder=False, **common) as test_loader:
        steps = train_loader.steps_total
        if steps == 0:
            raise ValueError(f"{train_loader.total_rows} training rows cannot give every one of {world_size} ranks "
                             f"a batch of {job.batch_size}")

        def checkpoint(epoch: int, step: int) -> None:
            if rank == 0:
                save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                                 "step": step, "world_size": world_size, "batch_size": job.batch_size,
                                 "seed": job.seed}, os.path.join(job.run_dir, CHECKPOINT_NAME))

        progress_every = max(1, steps // PROGRESS_LINES_PER_EPOCH)
        for epoch in range(start_epoch, job.epochs):
            first_step = start_step if epoch == start_epoch else 0
            train_loader.set_epoch(epoch, first_step)
            batches = (iter(train_loader) if job.loader == "spark-mnist" else
                       petastorm_batches(job.train_converter, rank=rank, world_size=world_size,
                                         batch_size=job.batch_size, steps=steps - first_step,
                                         image_shape=job.image_shape))
            ddp.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            samples, wait, stopped_at, epoch_start = 0, 0.0, None, time.perf_counter()
            for step in range(first_step, steps):
                t = time.perf_counter()
                images, labels = next(batches)
                wait += time.perf_counter() - t
                x = normalize(images.to(device, non_blocking=True), norm)
                y = labels.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=job.bf16):
                    loss = F.cross_entropy(ddp(x), y)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach().double() * len(y)
                samples += len(y)
                run_steps += 1
                if rank == 0 and (step + 1) % progress_every == 0 and step + 1 < steps:
                    done = (step + 1 - first_step) * job.batch_size * world_size
                    print(f"epoch {epoch + 1}/{job.epochs}: step {step + 1}/{steps}, "
                          f"{done / (time.perf_counter() - epoch_start):,.0f} samples/s", flush=True)
                if job.max_steps and run_steps == job.max_steps and step + 1 < steps:
                    stopped_at = step + 1
                    break
                if job.checkpoint_every_steps and (step + 1) % job.checkpoint_every_steps == 0 and step + 1 < steps:
                    checkpoint(epoch, step + 1)
            if stopped_at is not None:  # stopped by max_steps mid-epoch: checkpoint where it stopped, end the run
                checkpoint(epoch, stopped_at)
                break
            seconds = time.perf_counter() - epoch_start
            train_seconds += seconds
            totals = torch.stack([loss_sum, torch.tensor(float(samples), dtype=torch.float64, device=device)])
            dist.all_reduce(totals)
            waits = torch.tensor([wait, seconds], dtype=torch.float64, device=device)
            dist.all_reduce(waits)
            test_loss, correct, count = evaluate(model, test_loader, device, norm)
            record = {"epoch": epoch + 1, "train_loss": totals[0].item() / max(1.0, totals[1].item()),
                      "test_loss": test_loss / max(1, count), "test_accuracy": correct / max(1, count),
                      "test_samples": count, "samples_per_s": totals[1].item() / seconds,
                      "data_wait_fraction": waits[0].item() / max(1e-9, waits[1].item()),
                      "epoch_seconds": seconds}
            history.append(record)
            checkpoint(epoch + 1, 0)
            if rank == 0:
                print(f"epoch {epoch + 1}/{job.epochs}: train loss {record['train_loss']:.4f}, "
                      f"test accuracy {record['test_accuracy']:.4f} on {count} images, "
                      f"{record['samples_per_s']:,.0f} samples/s, data wait {record['data_wait_fraction']:.1%}, "
                      f"{seconds:.1f}s", flush=True)
            if job.max_steps and run_steps >= job.max_steps:
                break
    last = history[-1] if history else {}
    metrics = {"test_accuracy": last.get("test_accuracy"), "epochs": job.epochs, "world_size": world_size,
               "steps_per_epoch": steps, "batch_size": job.batch_size,
               "samples_per_epoch": steps * job.batch_size * world_size,
               "train_seconds": round(train_seconds, 3), "wall_seconds": round(time.perf_counter() - started, 3),
               "device": device.type, "loader": job.loader, "model_path": os.path.join(job.run_dir, MODEL_NAME),
               "history": history}
    if rank == 0:
        save_atomically(model.state_dict(), os.path.join(job.run_dir, MODEL_NAME))
        with open(os.path.join(job.run_dir, METRICS_NAME), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        from spark_mnist.tools.plots import maybe_training_curves  # never raises; warns once without matplotlib

        maybe_training_curves(history, os.path.join(job.run_dir, CURVES_NAME))
    # Every rank returns the same metrics: in local mode TorchDistributor keeps whichever rank's return value is
    # written last, not rank 0's.
    return metrics


def job_summary(job: TrainJob) -> dict[str, Any]:
    """The job's settings without file lists or converters, for logging."""
    return {f.name: getattr(job, f.name) for f in fields(job)
            if f.name not in ("train_files", "test_files", "train_converter")}
