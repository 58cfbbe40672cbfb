"""Models by name (spark_mnist.models): adding a model is one class and one registry line, and training and
evaluation then build it by name.  Also the normalisation constants, read from the dataset registry."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from torch import nn

from spark_mnist import models
from spark_mnist.config import TrainSettings
from spark_mnist.datasets import registry
from spark_mnist.errors import InputError
from spark_mnist.models import DEFAULT_MODEL, MODELS, SimpleCNN, build_model, normalization_for, register_model


@register_model("tiny-linear")  # the one registry line
class TinyLinear(nn.Module):
    """The whole model: one linear layer from the pixels to the classes."""

    def __init__(self, num_classes: int, image_shape: tuple[int, int]):
        super().__init__()
        self.classifier = nn.Linear(image_shape[0] * image_shape[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(x, 1))


@pytest.fixture(scope="module", autouse=True)
def unregister_tiny_linear():
    yield
    MODELS.pop("tiny-linear", None)


def test_build_model_by_name():
    assert type(build_model("simple-cnn", 10, (28, 28))) is SimpleCNN
    model = build_model("tiny-linear", 5, (8, 8))
    assert isinstance(model, TinyLinear) and model(torch.zeros(3, 1, 8, 8)).shape == (3, 5)
    assert TrainSettings().model == DEFAULT_MODEL == "simple-cnn"


def test_unknown_or_duplicate_names_are_refused():
    with pytest.raises(InputError, match=r"Invalid model: 'resnet-9000'\. Must be one of 'simple-cnn', "):
        build_model("resnet-9000", 10, (28, 28))
    with pytest.raises(ValueError, match=r"Invalid model name: 'simple-cnn'\. Must be a name not yet registered\."):
        register_model("simple-cnn")(TinyLinear)
    assert MODELS["simple-cnn"] is SimpleCNN


def test_normalization_comes_from_the_dataset_registry():
    for name, spec in registry().items():
        norm = normalization_for(name)
        assert (norm.mean, norm.std) == spec.normalization and 0 < norm.mean < 1 and 0 < norm.std < 1
    assert (normalization_for("mnist").mean, normalization_for("mnist").std) == (0.1307, 0.3081)
    with pytest.raises(InputError, match=r"Invalid dataset: 'cifar-10'\. Must be one of 'mnist'"):
        normalization_for("cifar-10")  # no silent fallback to 0.5/0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_registered_model_trains_and_evaluates_by_name(tmp_path, monkeypatch):
    """One rank of train_worker in this process (the environment torchrun would set), then evaluate_model."""
    from spark_mnist.job import TrainJob
    from spark_mnist.rank.train import train_worker
    from spark_mnist.shards import contract
    from spark_mnist.tools.evaluate import evaluate_model
    from tests.test_evaluate import write_tiny_dataset

    root = tmp_path / "data"
    write_tiny_dataset(root, train_rows=64, test_rows=40)
    dataset = contract.open_dataset(root)
    run_dir = tmp_path / "run"
    settings = TrainSettings(model="tiny-linear", epochs=2, batch_size=16, threads_per_rank=1, run_dir=str(run_dir))
    job = TrainJob(settings=settings, train_files=dataset.files("train"),
                   test_files=dataset.files("test"), dataset="fashion-mnist",
                   num_classes=10, image_shape=(28, 28), run_dir=str(run_dir))
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                        # torch's compiler, which DDP imports, sets this one when it is unset
                        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}.items():
        monkeypatch.setenv(name, value)
    threads = torch.get_num_threads()
    try:
        metrics = train_worker(job)
    finally:
        torch.set_num_threads(threads)
    assert metrics["model"] == "tiny-linear" and metrics["steps_per_epoch"] == 4
    assert [h["test_samples"] for h in metrics["history"]] == [40, 40]
    assert json.loads((run_dir / "metrics.json").read_text())["model"] == "tiny-linear"
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert set(state) == {"classifier.weight", "classifier.bias"}
    result = evaluate_model(root, run_dir / "model.pt")  # the name comes from metrics.json beside the model
    assert result.model == "tiny-linear" and result.samples == 40
    assert result.accuracy == pytest.approx(metrics["test_accuracy"])
    with pytest.raises(InputError, match="does not fit a SimpleCNN"):
        evaluate_model(root, run_dir / "model.pt", model="simple-cnn")


def test_models_module_has_no_per_dataset_constants():
    assert not [name for name in vars(models) if name.endswith("_NORMALIZATION")]
