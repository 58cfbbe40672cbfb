"""The model by name (spark_mnist.models): the one name the settings accept builds SimpleCNN, another is refused
in one line.  Also the normalisation constants, read from the dataset registry."""

from __future__ import annotations

import pytest
import torch

from spark_mnist import models
from spark_mnist.config import MODELS, TrainSettings, load_settings
from spark_mnist.datasets import registry
from spark_mnist.errors import InputError
from spark_mnist.models import DEFAULT_MODEL, SimpleCNN, build_model, normalization_for


def test_build_model_by_name():
    model = build_model("simple-cnn", 5, (8, 8))
    assert type(model) is SimpleCNN and model(torch.zeros(3, 1, 8, 8)).shape == (3, 5)
    assert TrainSettings().model == DEFAULT_MODEL == "simple-cnn" and MODELS == ("simple-cnn",)


def test_unknown_names_are_refused():
    with pytest.raises(InputError, match=r"Invalid model: 'resnet-9000'\. Must be one of 'simple-cnn'\.$"):
        build_model("resnet-9000", 10, (28, 28))  # e.g. a name another version wrote into metrics.json
    with pytest.raises(InputError, match=r"model: unexpected value; permitted: 'simple-cnn' \(got 'resnet-9000'\)"):
        load_settings(None, {"train": {"model": "resnet-9000"}})


def test_normalization_comes_from_the_dataset_registry():
    for name, spec in registry().items():
        norm = normalization_for(name)
        assert (norm.mean, norm.std) == spec.normalization and 0 < norm.mean < 1 and 0 < norm.std < 1
    assert (normalization_for("mnist").mean, normalization_for("mnist").std) == (0.1307, 0.3081)
    with pytest.raises(InputError, match=r"Invalid dataset: 'cifar-10'\. Must be one of 'mnist'"):
        normalization_for("cifar-10")  # no silent fallback to 0.5/0.5


def test_models_module_has_no_per_dataset_constants():
    assert not [name for name in vars(models) if name.endswith("_NORMALIZATION")]
