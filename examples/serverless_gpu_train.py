"""Train SimpleCNN on serverless GPU compute (Databricks AI Runtime) with your own loop and spark-mnist's loader.

A complete ``@distributed`` training function: Databricks AI Runtime runs ``train`` once per GPU with torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); :func:`spark_mnist.torch.loader` gives each rank its exact
share of an ingested dataset on a Unity Catalog volume, and its ``state_dict`` makes the loop resumable mid-epoch.
No Spark on the GPU nodes.

In a notebook attached to serverless GPU compute, with the wheel built as README says and installed with its
``ai-runtime`` extra (``%pip install "/Volumes/.../spark_mnist-0.2.0-py3-none-any.whl[ai-runtime]"``)::

    from examples.serverless_gpu_train import train
    from databricks.air import distributed

    results = distributed(num_accelerators=8, accelerator_type="GPU_8xH100")(train).distributed(
        "/Volumes/main/default/mnist/parquet/mnist", "/Volumes/main/default/mnist/runs/mnist-own-loop")
    results[0]   # rank 0's metrics

Or from a CPU notebook or job, submitting to serverless GPUs: ``python examples/serverless_gpu_train.py --data ...
--run-dir ... --accelerators 8 --accelerator-type GPU_8xH100 --remote``.  On a CPU machine the ranks use gloo;
CI runs this file under a stand-in for ``databricks.air`` that starts CPU processes (tests/test_examples.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional


def train(data: str, run_dir: str, epochs: int = 2, batch_size: int = 64, lr: float = 1e-3, seed: int = 0
          ) -> dict[str, Any]:
    """One rank of DDP training: ``epochs`` over ``data``'s training split, then accuracy on its test split.

    Rank 0 writes ``run_dir/model.pt`` (the ``state_dict``) and ``run_dir/own-loop-checkpoint.pt`` (model,
    optimizer and loader state) after every epoch; a rerun with the same ``run_dir`` continues from it.

    Returns:
        On every rank: ``test_accuracy`` (in [0, 1]), ``train_loss`` (mean cross-entropy of the last epoch, nats),
        ``world_size``, ``epochs``, ``device``.
    """
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    import spark_mnist
    import spark_mnist.torch
    from spark_mnist.models import build_model, normalization_for, normalize

    world = spark_mnist.torch.World.from_env()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", world.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        dataset = spark_mnist.open_dataset(data)
        norm = normalization_for(dataset.dataset)
        torch.manual_seed(seed)
        model = build_model("simple-cnn", len(dataset.classes), tuple(dataset.image_shape)).to(device)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=lr)
        train_loader = spark_mnist.torch.loader(data, "train", batch_size=batch_size, seed=seed, pin_memory=cuda)
        test_loader = spark_mnist.torch.loader(data, "test", batch_size=batch_size, pin_memory=cuda)
        checkpoint_path = os.path.join(run_dir, "own-loop-checkpoint.pt")
        if os.path.exists(checkpoint_path):  # resume: model, optimizer and the loader's position
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            train_loader.load_state_dict(state["loader"])
        # The loss is summed on the device and the sample count on the host: no host-device copy or sync per step.
        loss_total = torch.zeros((), dtype=torch.float64, device=device)
        samples = 0
        with train_loader, test_loader:
            while train_loader.epoch < epochs:
                ddp.train()
                loss_total.zero_()
                samples = 0
                for images, labels in train_loader:  # uint8 (B, 1, H, W), int64 (B,)
                    x = normalize(images.to(device, non_blocking=True), norm)
                    y = labels.to(device, non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(ddp(x), y)
                    loss.backward()
                    optimizer.step()
                    loss_total += loss.detach().double() * len(y)
                    samples += len(y)
                train_loader.set_epoch(train_loader.epoch + 1)
                if world.is_leader:
                    os.makedirs(run_dir, exist_ok=True)
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "loader": train_loader.state_dict()}, checkpoint_path)
            loss_sum = torch.stack([loss_total, torch.tensor(float(samples), dtype=torch.float64, device=device)])
            dist.all_reduce(loss_sum)
            model.eval()
            correct = torch.zeros((), dtype=torch.float64, device=device)
            seen = 0
            with torch.no_grad():
                for images, labels in test_loader:
                    logits = model(normalize(images.to(device, non_blocking=True), norm))
                    y = labels.to(device, non_blocking=True)
                    correct += (logits.argmax(1) == y).sum()
                    seen += len(y)
            counts = torch.stack([correct, torch.tensor(float(seen), dtype=torch.float64, device=device)])
            dist.all_reduce(counts)
        if world.is_leader:  # CPU tensors: the file loads on a machine without a GPU
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, os.path.join(run_dir, "model.pt"))
        return {"test_accuracy": counts[0].item() / max(1.0, counts[1].item()),
                "train_loss": loss_sum[0].item() / max(1.0, loss_sum[1].item()), "world_size": world.world_size,
                "epochs": epochs, "device": device.type}
    finally:
        dist.destroy_process_group()


def main(argv: Optional[list[str]] = None) -> int:
    """``python examples/serverless_gpu_train.py --data DIR --run-dir DIR [--accelerators N] ...``: launch
    :func:`train` with ``databricks.air.distributed`` and print rank 0's metrics as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the ingested dataset directory (a /Volumes path)")
    parser.add_argument("--run-dir", required=True, help="where model.pt and the checkpoint go")
    parser.add_argument("--accelerators", type=int, default=None, help="GPUs (default: all attached)")
    parser.add_argument("--accelerator-type", default=None, help="e.g. GPU_8xH100 (required with --remote)")
    parser.add_argument("--remote", action="store_true", help="submit to serverless GPUs from a CPU notebook/job")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    from databricks.air import distributed

    launch = distributed(num_accelerators=args.accelerators, accelerator_type=args.accelerator_type,
                         remote=args.remote)(train)
    results = launch.distributed(args.data, args.run_dir, args.epochs, args.batch_size)
    print(json.dumps(results[0]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
