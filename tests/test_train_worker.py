"""The per-rank training function without Spark, in every lane: it learns, and resuming (on another world size too)
gives the model an uninterrupted run gives.

The ranks run in this process (one rank) or in spawned processes (two ranks), on tiny learnable data: 8x8 images
whose class k is a bright 2x2 block at the k-th place of a grid, over noise.
"""

from __future__ import annotations

import logging
import math
import socket

import numpy as np
import pytest
import torch

from spark_mnist.config import TrainSettings
from spark_mnist.job import TrainJob
from spark_mnist.models import build_model
from spark_mnist.runs import CHECKPOINT_NAME, MODEL_NAME

SHAPE = (8, 8)
CLASSES = 10
BLOCK = 2


def learnable(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (rows, 8, 8) of noise in 0..79 with a 2x2 block in 200..255 at the place of their label."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(rows) % CLASSES).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, 80, size=(rows, *SHAPE), dtype=np.uint8)
    per_row = SHAPE[1] // BLOCK
    for k in range(CLASSES):
        r, c = divmod(k, per_row)
        chosen = labels == k
        images[chosen, r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK] = rng.integers(
            200, 256, size=(int(chosen.sum()), BLOCK, BLOCK), dtype=np.uint8)
    return images, labels


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, list[str]]:
    """The training split (600 rows, three shards of uneven rows) and the test split (200 rows), as shard files."""
    from spark_mnist.shards.parquet import write_rows

    root = tmp_path_factory.mktemp("learnable")
    files = {}
    for split, rows, bounds in (("train", 600, [0, 150, 410, 600]), ("test", 200, [0, 200])):
        images, labels = learnable(rows, seed=len(split))
        (root / split).mkdir()
        files[split] = []
        for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            path = str(root / split / f"part-{k:05d}.parquet")
            write_rows(path, lo, images[lo:hi], labels[lo:hi], 64)
            files[split].append(path)
    return files


def job_for(splits, run_dir, **settings) -> TrainJob:
    options = {**dict(epochs=2, batch_size=16, lr=3e-3, seed=3, threads_per_rank=1), **settings}
    return TrainJob(settings=TrainSettings(**options), train_files=splits["train"], test_files=splits["test"],
                    dataset="mnist", num_classes=CLASSES, image_shape=SHAPE, run_dir=str(run_dir),
                    dataset_id="generation:learnable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def run_one_rank(job: TrainJob, inductor_dir):
    """``train_worker(job)`` as rank 0 of 1 in this process (environment and torch threads restored); its store
    binds a port of the system's choosing (MASTER_PORT 0), which no other process can take first."""
    from spark_mnist.rank.train import train_worker

    with pytest.MonkeyPatch.context() as m:
        m.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor_dir))  # set by the optimizer's first step
        for name, value in rank_environment(0, 1, 0).items():
            m.setenv(name, value)
        threads = torch.get_num_threads()
        try:
            return train_worker(job)
        finally:
            torch.set_num_threads(threads)


@pytest.fixture
def one_rank(tmp_path):
    return lambda job: run_one_rank(job, tmp_path / "inductor")


def _spawned_rank(rank: int, world_size: int, ports: list[int], jobs: list[TrainJob]) -> None:
    import os

    from spark_mnist.rank.train import train_worker

    for port, job in zip(ports, jobs):
        os.environ.update(rank_environment(rank, world_size, port))
        train_worker(job)


def two_ranks(*jobs: TrainJob) -> None:
    """Runs ``train_worker(job)`` for each of ``jobs`` in turn, in two spawned processes, as a launcher would (one
    pair of processes for all, since starting one costs seconds)."""
    import torch.multiprocessing as mp

    ports = [free_port() for _ in jobs]
    mp.start_processes(_spawned_rank, args=(2, ports, list(jobs)), nprocs=2, start_method="spawn")


def trained(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / MODEL_NAME, weights_only=True)


def assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol) for k in a)


@pytest.fixture(scope="module")
def full_run(splits, tmp_path_factory):
    """The uncompiled two-epoch run the other runs are compared with, made once for the module (tests only read
    its run directory)."""
    run_dir = tmp_path_factory.mktemp("full")
    return run_one_rank(job_for(splits, run_dir), run_dir / "inductor"), run_dir


def test_training_learns(full_run):
    metrics, run_dir = full_run
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2] and metrics["steps_per_epoch"] == 600 // 16
    assert history[0]["train_loss"] < math.log(CLASSES)  # below guessing already in the first epoch
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]  # the loss falls
    assert history[-1]["test_loss"] < history[0]["test_loss"]
    assert all(0 <= h["data_wait_fraction"] < 1 for h in history)
    assert metrics["test_accuracy"] >= 0.1 + 0.5 and history[-1]["test_samples"] == 200  # far above chance (0.1)
    torch.manual_seed(3)
    untrained = build_model("simple-cnn", CLASSES, SHAPE).state_dict()
    assert not torch.allclose(trained(run_dir)["classifier.weight"], untrained["classifier.weight"], atol=1e-2)


def test_resume_mid_epoch_gives_the_trained_model_of_an_uninterrupted_run(one_rank, splits, full_run, tmp_path):
    full, full_dir = full_run
    run_dir = tmp_path / "interrupted"
    one_rank(job_for(splits, run_dir, max_steps=45))  # stops at step 8 of epoch 2
    state = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["loader"]
    assert (state["epoch"], state["step"], state["samples"]) == (1, 8, 8 * 16)
    halfway = trained(run_dir)
    resumed = one_rank(job_for(splits, run_dir, resume=True))
    assert_same_model(trained(run_dir), trained(full_dir), atol=1e-6)
    assert resumed["test_accuracy"] == pytest.approx(full["test_accuracy"])
    assert not torch.allclose(halfway["classifier.weight"], trained(run_dir)["classifier.weight"], atol=1e-3)


def test_resume_without_a_checkpoint_starts_afresh_and_says_so(one_rank, splits, tmp_path, capsys):
    run_dir = tmp_path / "run"
    one_rank(job_for(splits, run_dir, resume=True, max_steps=3))
    assert f"resume: no checkpoint in {run_dir}, starting afresh" in capsys.readouterr().out
    assert torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["loader"]["step"] == 3


def test_resume_with_another_seed_is_refused_in_one_line(one_rank, splits, tmp_path):
    from spark_mnist.errors import LoaderStateError

    run_dir = tmp_path / "run"
    one_rank(job_for(splits, run_dir, max_steps=5))
    with pytest.raises(LoaderStateError, match=rf"^Cannot resume: the seed is 3 in {run_dir / CHECKPOINT_NAME}, 7 in "
                                               r"this run\.$"):
        one_rank(job_for(splits, run_dir, resume=True, seed=7))
    assert (run_dir / "_errors" / "rank-0.json").exists()


@pytest.mark.slow
@pytest.mark.full
def test_elastic_resume_two_ranks_to_one_gives_the_model_of_two(one_rank, splits, tmp_path):
    """Checkpointed mid-epoch on 2 ranks (batch 8 each), resumed on 1 (batch 16): the global batches, and so the
    averaged gradients, are the same as an uninterrupted 2-rank run's."""
    two_dir, elastic_dir = tmp_path / "two", tmp_path / "elastic"
    two_ranks(job_for(splits, two_dir, batch_size=8), job_for(splits, elastic_dir, batch_size=8, max_steps=45))
    assert torch.load(elastic_dir / CHECKPOINT_NAME, weights_only=True)["loader"]["world_size"] == 2
    metrics = one_rank(job_for(splits, elastic_dir, batch_size=8, resume=True))
    assert metrics["world_size"] == 1 and metrics["batch_size"] == 16
    assert_same_model(trained(elastic_dir), trained(two_dir), atol=1e-4)


def test_resume_with_another_batch_size_on_the_same_world_size_is_refused(one_rank, splits, tmp_path):
    from spark_mnist.errors import LoaderStateError

    run_dir = tmp_path / "run"
    one_rank(job_for(splits, run_dir, max_steps=5))
    with pytest.raises(LoaderStateError, match=r"^Cannot resume: the global batch size is 16 in .*checkpoint\.pt, 32 "
                                               r"in this run \(batch size 32 x 1 ranks\)\.$"):
        one_rank(job_for(splits, run_dir, resume=True, batch_size=32))


# --- set-up, devices and saved files ----------------------------------------------------------------------------


def test_saved_files_load_with_a_plain_torch_load(full_run):
    """model.pt and checkpoint.pt hold CPU tensors: ``torch.load(path)`` (no map_location, weights-only default)
    works on a machine without a GPU and gives back the trained model."""
    _, run_dir = full_run
    state = torch.load(run_dir / MODEL_NAME)
    assert all(t.device.type == "cpu" for t in state.values())
    model = build_model("simple-cnn", CLASSES, SHAPE)
    model.load_state_dict(state)
    assert_same_model(model.state_dict(), trained(run_dir), atol=0)
    checkpoint = torch.load(run_dir / CHECKPOINT_NAME)
    assert all(t.device.type == "cpu" for t in checkpoint["model"].values())
    assert all(v.device.type == "cpu" for s in checkpoint["optimizer"]["state"].values() for v in s.values()
               if isinstance(v, torch.Tensor))


def test_train_seconds_are_the_epochs_reported(full_run):
    metrics, _ = full_run
    assert metrics["train_seconds"] == pytest.approx(sum(h["epoch_seconds"] for h in metrics["history"]), abs=2e-3)
    assert all(h["samples_per_s"] == pytest.approx((600 // 16) * 16 / h["epoch_seconds"]) for h in metrics["history"])


def test_to_cpu_keeps_the_structure():
    from spark_mnist.rank.checkpoint import to_cpu

    t = torch.ones(2, requires_grad=True)
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": t}}, "param_groups": [{"lr": 0.1, "params": [0]}],
             "pair": (t, 1)}
    moved = to_cpu(state)
    assert moved["param_groups"] == state["param_groups"] and moved["pair"][1] == 1
    assert torch.equal(moved["state"][0]["exp_avg"], t) and not moved["state"][0]["exp_avg"].requires_grad


def test_a_failing_process_group_set_up_leaves_the_rank_report(one_rank, splits, tmp_path, monkeypatch):
    import json

    import torch.distributed as dist

    def refuse(*args, **kwargs):
        raise RuntimeError("the rendezvous is unreachable")

    monkeypatch.setattr(dist, "init_process_group", refuse)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the rendezvous is unreachable"):
        one_rank(job_for(splits, run_dir))
    report = json.loads((run_dir / "_errors" / "rank-0.json").read_text())
    assert report["exception"] == "RuntimeError: the rendezvous is unreachable"
    assert not dist.is_initialized()


def test_an_error_aborts_the_process_group_rather_than_waiting_on_it(one_rank, splits, tmp_path, monkeypatch):
    import torch.distributed as dist

    from spark_mnist.rank import train

    def fail(*args, **kwargs):
        raise ValueError("a rank's own error")

    def waits(*args, **kwargs):
        raise AssertionError("destroy_process_group waits on outstanding collectives")

    monkeypatch.setattr(train, "_train", fail)
    monkeypatch.setattr(dist, "destroy_process_group", waits)
    with pytest.raises(ValueError, match="a rank's own error"):
        one_rank(job_for(splits, tmp_path / "run"))
    assert not dist.is_initialized() and (tmp_path / "run" / "_errors" / "rank-0.json").exists()


def test_a_local_rank_without_a_gpu_of_its_own_is_refused(splits, tmp_path, monkeypatch):
    """Two ranks on a node where one GPU is visible: rank 1 is refused in one line, with its report, before it
    touches the device or the process group."""
    from spark_mnist.errors import EnvironmentMismatchError
    from spark_mnist.rank.train import train_worker

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device called"))
    for name, value in {**rank_environment(1, 2, free_port()), "CUDA_VISIBLE_DEVICES": "3"}.items():
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(EnvironmentMismatchError, match=r"^LOCAL_RANK 1 has no GPU of its own: torch sees 1 CUDA "
                                                           r"device\(s\) on this worker \(CUDA_VISIBLE_DEVICES=3\)"):
            train_worker(job_for(splits, tmp_path / "run", use_gpu=True))
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "run" / "_errors" / "rank-1.json").exists()


def test_threads_per_rank_divide_the_cores_among_the_nodes_ranks(monkeypatch):
    import os

    from spark_mnist.rank.device import threads_per_rank

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert [threads_per_rank(0, n) for n in (1, 4, 16, 32)] == [16, 4, 1, 1]
    assert threads_per_rank(3, 8) == 3


# --- the data on the device, faster steps --------------------------------------------------------------------------


def test_resident_data_on_the_cpu_trains_the_model_of_host_batches(one_rank, splits, full_run, tmp_path):
    """``resident_data: on`` (the CPU standing in for the device): the same batches, so the same model and figures
    as the host path ("auto" is off on the CPU); past the budget it falls back to the host path."""
    full, full_dir = full_run
    assert full["resident_data"] is False and full["channels_last"] is False and full["compiled"] is False
    metrics = one_rank(job_for(splits, tmp_path / "resident", resident_data="on"))
    assert metrics["resident_data"] is True
    assert_same_model(trained(tmp_path / "resident"), trained(full_dir), atol=0)
    assert [h["train_loss"] for h in metrics["history"]] == [h["train_loss"] for h in full["history"]]
    assert metrics["test_accuracy"] == full["test_accuracy"]
    over = one_rank(job_for(splits, tmp_path / "over", resident_data="on", memory_budget_mb=0))
    assert over["resident_data"] is False and over["test_accuracy"] == full["test_accuracy"]


def test_channels_last_on_the_cpu_trains(one_rank, splits, full_run, tmp_path):
    """``channels_last: on``: the model and its input in channels_last; other conv kernels, so the same model up to
    rounding (not bit for bit)."""
    full, full_dir = full_run
    metrics = one_rank(job_for(splits, tmp_path / "cl", channels_last="on"))
    assert metrics["channels_last"] is True and metrics["test_accuracy"] >= 0.1 + 0.5
    assert metrics["test_accuracy"] == pytest.approx(full["test_accuracy"], abs=0.05)
    assert_same_model(trained(tmp_path / "cl"), trained(full_dir), atol=1e-3)


def test_a_failing_compile_falls_back_with_one_warning_line(one_rank, splits, full_run, tmp_path, monkeypatch,
                                                            caplog):
    """The compiled model's first step fails (as where inductor finds no C compiler): one warning line naming the
    error, the step runs again uncompiled, and the run is the uncompiled one's."""
    full, full_dir = full_run

    def compile_that_fails(module, **kwargs):
        def step(*args, **kw):
            raise RuntimeError("InductorError: no working C compiler found\n(a long traceback follows)")
        return step

    monkeypatch.setattr(torch, "compile", compile_that_fails)
    with caplog.at_level(logging.WARNING, logger="spark_mnist.rank.train"):
        metrics = one_rank(job_for(splits, tmp_path / "fell-back", compile=True))
    lines = [r.getMessage() for r in caplog.records if r.name == "spark_mnist.rank.train"]
    assert lines == ["rank 0: torch.compile failed, training uncompiled: RuntimeError: InductorError: no working C "
                     "compiler found"]
    assert metrics["compiled"] is False
    assert_same_model(trained(tmp_path / "fell-back"), trained(full_dir), atol=0)


@pytest.mark.slow
@pytest.mark.full  # a minute of CPU to compile: one lane (the forced fallback runs in every lane)
def test_compile_on_the_cpu_trains(one_rank, splits, full_run, tmp_path, caplog, monkeypatch):
    """``compile: true`` on the CPU (inductor with gcc; about 30 s to compile): the compiled step trains to the
    uncompiled run's accuracy, without falling back."""
    full, _ = full_run
    # Inductor sets this (a pointer, for the modules it loads) in os.environ each time it loads one: not a leak.
    monkeypatch.setenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", "")  # so that monkeypatch removes it afterwards
    monkeypatch.delenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR")
    with caplog.at_level(logging.WARNING, logger="spark_mnist.rank.train"):
        metrics = one_rank(job_for(splits, tmp_path / "compiled", compile=True))
    assert not [r for r in caplog.records if r.name == "spark_mnist.rank.train"]
    assert metrics["compiled"] is True and metrics["test_accuracy"] >= 0.1 + 0.5
    assert metrics["test_accuracy"] == pytest.approx(full["test_accuracy"], abs=0.05)


def test_data_wait_on_the_cpu_is_the_time_spent_fetching_not_computing():
    """On the CPU the device is the host: what ``next()`` takes is what the device waited; the step between two
    fetches does not count."""
    import time

    from spark_mnist.rank.device import DataWait

    def slow_batches():
        for _ in range(3):
            time.sleep(0.02)
            yield torch.zeros(2, 1, *SHAPE, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)

    wait, batches = DataWait(torch.device("cpu")), slow_batches()
    for _ in range(3):
        images, labels = wait.next(batches)
        time.sleep(0.05)  # the step's computing
    assert images.shape == (2, 1, *SHAPE) and labels.dtype == torch.int64
    assert 0.06 <= wait.seconds() < 0.06 + 0.1


def test_a_slow_loader_shows_in_the_data_wait_fraction(one_rank, splits, tmp_path, monkeypatch):
    import time

    from spark_mnist.rank import train

    batches = train._Run.batches

    def slow(run):
        for batch in batches(run):
            time.sleep(0.02)
            yield batch

    monkeypatch.setattr(train._Run, "batches", slow)
    metrics = one_rank(job_for(splits, tmp_path / "run", epochs=1))
    assert 0.3 < metrics["history"][0]["data_wait_fraction"] <= 1


def test_no_ddp_model_outlives_the_rank_function(one_rank, splits, tmp_path):
    """train_worker frees the run's DDP model (a reference cycle, with the process group) before it returns, so no
    process group is left for the interpreter's teardown, where gloo's threads can abort the rank (SIGABRT)."""
    import gc

    from torch.nn.parallel import DistributedDataParallel

    gc.disable()  # only train_worker's own collection may free the cycle
    try:
        one_rank(job_for(splits, tmp_path / "run", epochs=1))
        alive = [o for o in gc.get_objects() if isinstance(o, DistributedDataParallel)]
    finally:
        gc.enable()
    assert alive == []
