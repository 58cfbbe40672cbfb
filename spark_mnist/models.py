"""The default model and the per-dataset normalisation constants.  Runs on every rank.

SimpleCNN is the network of the common Databricks MNIST how-to (and of pytorch/examples ``mnist/main.py`` in
spirit): two 3x3 convolutions with ReLU and 2x2 max-pooling, then one linear layer to the classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``mean`` and ``std`` of the training pixels scaled to [0, 1]."""

    mean: float
    std: float


# Training-split pixel statistics, pixels scaled to [0, 1].
MNIST_NORMALIZATION = Normalization(mean=0.1307, std=0.3081)
FASHION_MNIST_NORMALIZATION = Normalization(mean=0.2860, std=0.3530)
KMNIST_NORMALIZATION = Normalization(mean=0.1918, std=0.3483)
EMNIST_NORMALIZATION = Normalization(mean=0.1751, std=0.3332)
DEFAULT_NORMALIZATION = Normalization(mean=0.5, std=0.5)

PIXEL_MAX = 255.0


def normalization_for(dataset: str) -> Normalization:
    """The normalisation constants of ``dataset`` (registry name); EMNIST splits share one pair."""
    named = {"mnist": MNIST_NORMALIZATION, "fashion-mnist": FASHION_MNIST_NORMALIZATION,
             "kmnist": KMNIST_NORMALIZATION}
    if dataset.startswith("emnist-"):
        return EMNIST_NORMALIZATION
    return named.get(dataset, DEFAULT_NORMALIZATION)


def normalize(images: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """uint8 images (B, 1, H, W) -> float32 ``(x / 255 - mean) / std``, on ``images``' device."""
    scale = 1.0 / (PIXEL_MAX * norm.std)
    return images.to(torch.float32).mul_(scale).sub_(norm.mean / norm.std)


class SimpleCNN(nn.Module):
    """conv 3x3 1->32, ReLU, max-pool 2x2, conv 3x3 32->64, ReLU, max-pool 2x2, linear 64*7*7 -> classes.

    Input: float32 (B, 1, 28, 28) normalised images.  Output: float32 logits (B, num_classes).
    """

    CONV1_CHANNELS = 32
    CONV2_CHANNELS = 64
    KERNEL = 3
    POOL = 2

    def __init__(self, num_classes: int = 10, image_shape: tuple[int, int] = (28, 28)):
        super().__init__()
        pooled = (image_shape[0] // self.POOL // self.POOL, image_shape[1] // self.POOL // self.POOL)
        self.features = nn.Sequential(
            nn.Conv2d(1, self.CONV1_CHANNELS, self.KERNEL, padding=self.KERNEL // 2),
            nn.ReLU(),
            nn.MaxPool2d(self.POOL),
            nn.Conv2d(self.CONV1_CHANNELS, self.CONV2_CHANNELS, self.KERNEL, padding=self.KERNEL // 2),
            nn.ReLU(),
            nn.MaxPool2d(self.POOL),
        )
        self.classifier = nn.Linear(self.CONV2_CHANNELS * pooled[0] * pooled[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
