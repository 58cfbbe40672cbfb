"""GPU-only code paths: pinned-memory batches, non_blocking copies, nccl, bf16 autocast.  Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from spark_mnist.shards.parquet import record_batch
from spark_mnist.rank.loader import ShardLoader
from spark_mnist.models import SimpleCNN, normalization_for, normalize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def shard(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(300, 28, 28), dtype=np.uint8)
    labels = (np.arange(300) % 10).astype(np.uint8)
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.Table.from_batches([record_batch(0, images, labels)]), path, row_group_size=64)
    return [str(path)], images


@pytest.mark.parametrize("streaming", [False, True])
def test_pinned_batches_copy_non_blocking(shard, streaming):
    paths, images = shard
    device = torch.device("cuda", 0)
    with ShardLoader(paths, rank=0, world_size=1, batch_size=32, pin_memory=True,
                     memory_budget_bytes=0 if streaming else 2**30) as loader:
        for index, x, y in loader.iter_with_index():
            assert x.is_pinned() and y.is_pinned() and index.is_pinned()  # batches across windows too
            on_device = x.to(device, non_blocking=True)
            torch.cuda.synchronize()
            assert torch.equal(on_device.cpu()[:, 0], torch.from_numpy(images[index.numpy()]))


def test_bf16_autocast_forward_backward():
    device = torch.device("cuda", 0)
    model = SimpleCNN().to(device)
    x = normalize(torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, device=device),
                  normalization_for("fashion-mnist"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), torch.zeros(8, dtype=torch.long, device=device))
    loss.backward()
    assert model.classifier.weight.grad is not None


def test_nccl_process_group_single_rank(tmp_path):
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("torch built without NCCL")
    from spark_mnist.rank.device import PROCESS_GROUP_TIMEOUT

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1,
                            timeout=PROCESS_GROUP_TIMEOUT, device_id=torch.device("cuda", 0))
    try:
        t = torch.ones(4, device="cuda")
        dist.all_reduce(t)
        assert t.sum().item() == 4
    finally:
        dist.destroy_process_group()
