"""spark_mnist.torch.MNIST, the map-style drop-in for torchvision's dataset class: items as torchvision builds them
(a mode "L" PIL image and an int), its attributes, transforms, DataLoader and DistributedSampler, every registry
dataset, and the one clear error of a bad root.  Small datasets written without Spark (the test kit's writer)."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from spark_mnist import load_data
from spark_mnist.datasets import DIGITS, get_dataset
from spark_mnist.errors import DatasetMismatchError, DatasetNotFoundError, EnvironmentMismatchError, InputError
from spark_mnist.testing import make_arrays, write_ingested_dataset
from spark_mnist.torch import EMNIST, KMNIST, MNIST, FashionMNIST

TRAIN_ROWS, TEST_ROWS = 120, 41


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Ingested datasets by registry name: mnist, kmnist, emnist-letters (stored transposed in its IDX files)."""
    base = tmp_path_factory.mktemp("mnist_dataset")
    return {name: write_ingested_dataset(base / name, name, train_rows=TRAIN_ROWS, test_rows=TEST_ROWS, seed=4)
            for name in ("mnist", "kmnist", "emnist-letters")}


def as_tensor(img: Image.Image) -> torch.Tensor:
    """A ``ToTensor``-like transform: float32 (1, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).unsqueeze(0)


@pytest.mark.parametrize("train", [True, False])
def test_items_and_attributes_are_torchvisions_over_the_ingested_arrays(roots, train):
    (x_train, y_train), (x_test, y_test) = load_data(roots["mnist"])
    images, labels = (x_train, y_train) if train else (x_test, y_test)
    written, _ = make_arrays(TRAIN_ROWS if train else TEST_ROWS, 4 if train else 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DeprecationWarning from Pillow's fromarray(mode=...)
        ds = MNIST(roots["mnist"], train=train)
        items = [ds[i] for i in range(len(ds))]
    assert len(ds) == len(labels) == (TRAIN_ROWS if train else TEST_ROWS) and ds.train is train
    assert ds.data.dtype == torch.uint8 and ds.data.shape == (len(ds), 28, 28)
    assert ds.targets.dtype == torch.int64 and ds.targets.shape == (len(ds),)
    assert torch.equal(ds.data, torch.from_numpy(images)) and np.array_equal(images, written)
    assert torch.equal(ds.targets, torch.from_numpy(labels.astype(np.int64)))
    assert ds.classes == list(DIGITS) and ds.class_to_idx == {str(d): d for d in range(10)}
    for i, (img, target) in enumerate(items):
        assert isinstance(img, Image.Image) and img.mode == "L" and img.size == (28, 28)
        assert type(target) is int and target == int(labels[i])
        assert np.array_equal(np.asarray(img), images[i])
        assert img.tobytes() == Image.fromarray(ds.data[i].numpy()).tobytes()  # torchvision's own construction
    assert ds[-1][1] == int(labels[-1])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_transform_and_target_transform_are_applied(roots):
    ds = MNIST(roots["mnist"], transform=as_tensor, target_transform=lambda t: t + 100)
    image, target = ds[3]
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
    assert torch.equal(image, ds.data[3].float().unsqueeze(0) / 255)
    assert target == int(ds.targets[3]) + 100
    assert "Transform" in repr(ds) and "Number of datapoints: 120" in repr(ds)


def test_a_shuffled_dataloader_yields_every_pair_once(roots):
    ds = MNIST(roots["mnist"], train=False, transform=lambda img: torch.from_numpy(np.array(img)))
    loader = DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert [len(y) for _, y in batches] == [16, 16, 9]
    assert batches[0][0].dtype == torch.uint8 and batches[0][0].shape == (16, 28, 28)
    assert batches[0][1].dtype == torch.int64
    got = sorted((x.numpy().tobytes(), int(t)) for images, y in batches for x, t in zip(images, y))
    assert got == sorted((ds.data[i].numpy().tobytes(), int(ds.targets[i])) for i in range(len(ds)))


def test_a_distributed_sampler_over_two_ranks_covers_every_index_once(roots):
    ds = MNIST(roots["mnist"], transform=as_tensor)
    shares = [list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=1)) for r in range(2)]
    assert [len(s) for s in shares] == [TRAIN_ROWS // 2] * 2
    assert sorted(shares[0] + shares[1]) == list(range(TRAIN_ROWS))
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=1)
    labels = torch.cat([y for _, y in DataLoader(ds, batch_size=8, sampler=sampler)])
    assert torch.equal(labels, ds.targets[shares[1]])


def test_another_registry_dataset_is_served_with_its_own_classes(roots):
    (x_train, y_train), _ = load_data(roots["kmnist"])
    for cls in (MNIST, KMNIST):
        ds = cls(roots["kmnist"], download=True)  # download is torchvision's argument: accepted, nothing fetched
        assert ds.dataset == "kmnist" and ds.classes == list(get_dataset("kmnist").classes)
        assert torch.equal(ds.data, torch.from_numpy(x_train)) and ds[7][1] == int(y_train[7])
    letters = EMNIST(roots["emnist-letters"], split="letters", train=False)
    _, (x_test, y_test) = load_data(roots["emnist-letters"])
    assert letters.classes[0] == "N/A" and len(letters.classes) == 27 and letters.split == "letters"
    assert np.array_equal(np.asarray(letters[5][0]), x_test[5])  # upright, as ingested
    assert torch.equal(letters.targets, torch.from_numpy(y_test.astype(np.int64)))
    assert torch.equal(MNIST(roots["emnist-letters"], train=False).data, letters.data)


@pytest.mark.parametrize(("make", "message"), [
    (lambda roots: FashionMNIST(roots["kmnist"]), r"holds 'kmnist', not 'fashion-mnist' \(FashionMNIST\)"),
    (lambda roots: KMNIST(roots["mnist"]), r"holds 'mnist', not 'kmnist' \(KMNIST\)"),
    (lambda roots: EMNIST(roots["emnist-letters"], split="digits"),
     r"holds 'emnist-letters', not 'emnist-digits' \(EMNIST\)"),
])
def test_an_alias_refuses_another_dataset(roots, make, message):
    with pytest.raises(DatasetMismatchError, match=message + "; spark_mnist.torch.MNIST serves any"):
        make(roots)


def test_emnist_names_its_splits():
    with pytest.raises(InputError, match=r"Invalid split: 'nope'\. Must be one of 'byclass', 'bymerge'"):
        EMNIST("unused", split="nope")


def test_a_bad_root_raises_open_datasets_one_error(tmp_path):
    from spark_mnist import open_dataset

    with pytest.raises(DatasetNotFoundError) as expected:
        open_dataset(tmp_path / "nothing")
    with pytest.raises(DatasetNotFoundError, match="no manifest") as raised:
        MNIST(tmp_path / "nothing")
    assert str(raised.value) == str(expected.value) and "\n" not in str(raised.value)


def test_without_pillow_it_names_what_to_install(roots, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(EnvironmentMismatchError, match=r"spark_mnist\.torch\.MNIST needs PIL\.Image"):
        MNIST(roots["mnist"])


def test_torchvision_is_never_imported(roots):
    MNIST(roots["mnist"])[0]
    assert "torchvision" not in sys.modules
