"""PNG pictures: preview grid, training curves, confusion matrix (no Spark; skipped without matplotlib)."""

from __future__ import annotations

import struct
import sys

import numpy as np
import pytest

from spark_mnist.tools import plots
from spark_mnist.datasets import get_dataset
from spark_mnist.shards.arrays import write_local_dataset
from spark_mnist.errors import DatasetNotFoundError, InputError
from spark_mnist.tools.evaluate import result_from_confusion

pytest.importorskip("matplotlib")

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HISTORY = [
    {"epoch": 1, "train_loss": 0.62, "test_loss": 0.45, "test_accuracy": 0.84, "test_samples": 10000,
     "samples_per_s": 9000.0, "data_wait_fraction": 0.01, "epoch_seconds": 6.6},
    {"epoch": 2, "train_loss": 0.38, "test_loss": 0.36, "test_accuracy": 0.87, "test_samples": 10000,
     "samples_per_s": 9100.0, "data_wait_fraction": 0.01, "epoch_seconds": 6.5},
    {"epoch": 3, "train_loss": 0.31, "test_loss": 0.33, "test_accuracy": 0.885, "test_samples": 10000,
     "samples_per_s": 9050.0, "data_wait_fraction": 0.01, "epoch_seconds": 6.6},
]


def glyph(label: int) -> np.ndarray:
    """A 28x28 image that shows its label: a bar of width 2 * (label + 1) in a frame."""
    image = np.zeros((28, 28), dtype=np.uint8)
    image[3:25, 3] = image[3:25, 24] = image[3, 3:25] = image[24, 3:25] = 120
    image[6:22, 4:4 + 2 * (label + 1)] = 255
    return image


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """64 train / 40 test rows in two shards per split with 9-row row groups, labels 0..9 repeating."""
    root = tmp_path_factory.mktemp("plots") / "data"
    splits = {}
    for split, rows in (("train", 64), ("test", 40)):
        labels = (np.arange(rows) % 10).astype(np.uint8)
        images = np.stack([glyph(int(y)) for y in labels])
        splits[split] = (images, labels)
    write_local_dataset(root, get_dataset("fashion-mnist"), splits, num_shards=2, rows_per_group=9)
    return root


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the magic bytes."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_sample_rows_are_the_stored_rows_and_seeded(data):
    index, images, labels, manifest = plots.sample_rows(data, "train", 20, seed=3)
    assert len(index) == len(np.unique(index)) == 20 and list(manifest.classes) == CLASSES
    assert images.shape == (20, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == (index % 10).tolist()
    assert all(np.array_equal(image, glyph(int(y))) for image, y in zip(images, labels))
    assert np.array_equal(plots.sample_rows(data, "train", 20, seed=3)[0], index)
    assert not np.array_equal(plots.sample_rows(data, "train", 20, seed=4)[0], index)
    everything = plots.sample_rows(data, "test", 1000)[0]
    assert sorted(everything.tolist()) == list(range(40))


def test_preview_grid_png(data, tmp_path):
    out = plots.preview_grid(data, tmp_path / "pics" / "grid.png")
    assert out == tmp_path / "pics" / "grid.png" and out.stat().st_size > 5_000
    assert png_size(out) == (8 * 130, 4 * 145 + 40)
    other = plots.preview_grid(data, tmp_path / "other.png", split="test", seed=1)
    assert png_size(other) == (8 * 130, 4 * 145 + 40) and other.read_bytes() != out.read_bytes()
    assert list(tmp_path.glob(".*tmp*")) == [] and list((tmp_path / "pics").glob(".*")) == []


def test_preview_grid_errors(data, tmp_path):
    with pytest.raises(DatasetNotFoundError):
        plots.preview_grid(tmp_path / "nothing", tmp_path / "x.png")
    with pytest.raises(InputError, match="Invalid split"):
        plots.preview_grid(data, tmp_path / "x.png", split="validation")
    assert not (tmp_path / "x.png").exists()


def test_training_curves_png(tmp_path):
    out = plots.training_curves(HISTORY, tmp_path / "curves.png")
    assert png_size(out) == (1000, 400) and out.stat().st_size > 5_000
    one_epoch = plots.training_curves(HISTORY[:1], tmp_path / "one.png")
    assert png_size(one_epoch) == (1000, 400)
    with pytest.raises(InputError, match="empty"):
        plots.training_curves([], tmp_path / "none.png")


def test_confusion_matrix_png(tmp_path):
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 5, size=(10, 10)) + np.diag(rng.integers(50, 100, size=10))
    result = result_from_confusion(confusion, CLASSES, dataset="fashion-mnist", split="test")
    out = plots.confusion_matrix_png(result, tmp_path / "confusion.png")
    assert png_size(out)[0] > 500 and out.stat().st_size > 5_000
    many = result_from_confusion(np.eye(25, dtype=np.int64) * 3, [chr(65 + i) for i in range(25)], dataset="x",
                                 split="test")
    assert png_size(plots.confusion_matrix_png(many, tmp_path / "big.png"))[0] > png_size(out)[0]


def test_missing_matplotlib_is_an_input_error_with_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(InputError, match=r"pip install 'spark-mnist\[plots\]'"):
        plots.training_curves(HISTORY, tmp_path / "curves.png")
    warnings = []
    monkeypatch.setattr(plots.log, "warning", lambda *args: warnings.append(args[0] % args[1:]))
    assert plots.maybe_training_curves(HISTORY, tmp_path / "a.png") is None
    assert len(warnings) == 1 and "spark-mnist[plots]" in warnings[0]
    assert not (tmp_path / "a.png").exists()


def test_maybe_training_curves_writes_or_logs(tmp_path, monkeypatch):
    assert plots.maybe_training_curves(HISTORY, tmp_path / "curves.png") == tmp_path / "curves.png"
    warnings = []
    monkeypatch.setattr(plots.log, "warning", lambda *args: warnings.append(args[0] % args[1:]))
    assert plots.maybe_training_curves([], tmp_path / "none.png") is None
    assert len(warnings) == 1 and "empty" in warnings[0]
