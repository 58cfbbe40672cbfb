"""The model by name, and the input normalisation it expects.  Runs on every rank and in the evaluating tools.

The model maps float32 normalised images (B, 1, H, W) to float32 logits (B, num_classes); training, evaluation and
tracking build it by its name (:func:`build_model`, setting ``train.model``, whose values are
:data:`spark_mnist.config.MODELS`).

SimpleCNN (``"simple-cnn"``) is the network of the common Databricks MNIST how-to (and of pytorch/examples
``mnist/main.py`` in spirit): two 3x3 convolutions with ReLU and 2x2 max-pooling, then one linear layer to the
classes.

The normalisation constants of each dataset live in the dataset registry (:mod:`spark_mnist.datasets`, with their
source); :func:`normalization_for` reads them there.
"""

from typing import NamedTuple

import torch
from torch import nn

from spark_mnist.config import MODELS
from spark_mnist.datasets import get_dataset
from spark_mnist.errors import InputError, check_choice

__all__ = ["PIXEL_MAX", "DEFAULT_MODEL", "build_model", "Normalization", "normalization_for", "normalize", "SimpleCNN"]

PIXEL_MAX = 255.0
# The model of runs whose metrics.json names none; TrainSettings.model's default.
DEFAULT_MODEL = MODELS[0]


def build_model(name: str, num_classes: int, image_shape: tuple[int, int]) -> nn.Module:
    """A fresh model ``name`` (:class:`SimpleCNN`, the one model) for ``num_classes`` classes and images of
    ``image_shape`` (H, W) pixels.

    The model maps float32 (B, 1, H, W) images normalised by :func:`normalize` to float32 logits (B, num_classes).

    Raises:
        InputError: an unknown ``name`` (``Invalid model: 'x'. Must be one of 'simple-cnn'.``), e.g. one a
            metrics file names.
    """
    check_choice("model", name, MODELS, InputError)
    return SimpleCNN(num_classes, image_shape)


class Normalization(NamedTuple):
    """Per-channel ``mean`` and ``std`` of the training pixels scaled to [0, 1]."""

    mean: float
    std: float


def normalization_for(dataset: str) -> Normalization:
    """The normalisation constants of ``dataset`` (a registry name), from its registry entry.

    Raises:
        InputError: ``dataset`` is not in the registry (the message lists the known ones).
    """
    return Normalization(*get_dataset(dataset).normalization)


def normalize(images: torch.Tensor, norm: Normalization, channels_last: bool = False) -> torch.Tensor:
    """uint8 images (B, 1, H, W) -> float32 ``(x / 255 - mean) / std``, on ``images``' device, in
    ``torch.channels_last`` memory format with ``channels_last`` (for a model in that format).

    Source: pytorch/examples ``mnist/main.py`` (``ToTensor`` then ``Normalize``), done on the device in one pass.
    """
    x = images.to(torch.float32).mul_(1.0 / (PIXEL_MAX * norm.std)).sub_(norm.mean / norm.std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class SimpleCNN(nn.Module):
    """conv 3x3 1->32, ReLU, max-pool 2x2, conv 3x3 32->64, ReLU, max-pool 2x2, linear 64*(H/4)*(W/4) -> classes.

    Input: float32 (B, 1, H, W) normalised images (28x28 for the MNIST family).  Output: float32 logits
    (B, num_classes).
    """

    CONV1_CHANNELS = 32
    CONV2_CHANNELS = 64
    KERNEL = 3
    POOL = 2

    def __init__(self, num_classes: int = 10, image_shape: tuple[int, int] = (28, 28)):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((1, self.CONV1_CHANNELS), (self.CONV1_CHANNELS, self.CONV2_CHANNELS)):
            conv = nn.Conv2d(c_in, c_out, self.KERNEL, padding=self.KERNEL // 2)
            layers += [conv, nn.ReLU(), nn.MaxPool2d(self.POOL)]
        self.features = nn.Sequential(*layers)
        pooled = (image_shape[0] // self.POOL**2, image_shape[1] // self.POOL**2)  # two 2x2 poolings
        self.classifier = nn.Linear(self.CONV2_CHANNELS * pooled[0] * pooled[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
