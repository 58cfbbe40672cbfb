"""Offline evaluation of a saved model on a tiny hand-written dataset (no Spark)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spark_mnist.datasets import get_dataset
from spark_mnist.shards.arrays import write_local_dataset
from spark_mnist.errors import DatasetMismatchError, DatasetNotFoundError, InputError
from spark_mnist.tools.evaluate import EvaluationResult, evaluate_model, format_report, result_from_confusion
from spark_mnist.models import SimpleCNN, normalization_for, normalize

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def write_tiny_dataset(root, train_rows=64, test_rows=40, shards=2, row_group=9, seed=0, labels_fn=None):
    """A contract-shaped dataset: ``shards`` Parquet files per split with small row groups and a manifest."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, rows in (("train", train_rows), ("test", test_rows)):
        images = rng.integers(0, 256, size=(rows, 28, 28), dtype=np.uint8)
        labels = (labels_fn(rows) if labels_fn else rng.integers(0, 10, size=rows)).astype(np.uint8)
        arrays[split] = (images, labels)
    write_local_dataset(root, get_dataset("fashion-mnist"), arrays, num_shards=shards, rows_per_group=row_group)
    return arrays


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    return root, write_tiny_dataset(root)


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "run" / "model.pt"
    path.parent.mkdir()
    torch.save(SimpleCNN(10).state_dict(), path)
    return path


def confusion_matrix(labels, predictions, num_classes):
    """(C, C) int64 counts, rows the true class, columns the predicted class: computed apart from the code tested."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return counts


def direct_predictions(model_path, images):
    model = SimpleCNN(10)
    model.load_state_dict(torch.load(model_path, weights_only=True))
    model.eval()
    with torch.no_grad():
        x = normalize(torch.from_numpy(images).unsqueeze(1), normalization_for("fashion-mnist"))
        return model(x).argmax(1).numpy()


def test_figures_are_consistent_and_match_a_direct_forward_pass(data, model_file):
    root, arrays = data
    images, labels = arrays["test"]
    result = evaluate_model(root, model_file, batch_size=7)
    assert isinstance(result, EvaluationResult)
    assert result.samples == 40 == int(result.confusion.sum())
    assert result.confusion.dtype == np.int64 and result.confusion.shape == (10, 10)
    assert result.classes == CLASSES and result.dataset == "fashion-mnist" and result.split == "test"
    assert result.accuracy == pytest.approx(np.trace(result.confusion) / result.confusion.sum())
    assert result.confusion.sum(axis=1).tolist() == np.bincount(labels, minlength=10).tolist()
    for i, accuracy in enumerate(result.per_class_accuracy):
        row = result.confusion[i]
        assert accuracy is None if row.sum() == 0 else accuracy == pytest.approx(row[i] / row.sum())
    expected = confusion_matrix(labels, direct_predictions(model_file, images), 10)
    assert np.array_equal(result.confusion, expected)
    # the batch size changes nothing; the train split can be evaluated too
    assert np.array_equal(evaluate_model(root, model_file, batch_size=1000).confusion, expected)
    assert evaluate_model(root, model_file, split="train").samples == 64
    assert result.model == "simple-cnn"  # no metrics.json beside the model file: the default model


def test_a_model_that_always_says_class_3(data, tmp_path):
    root, arrays = data
    labels = arrays["test"][1]
    model = SimpleCNN(10)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(-50.0)
        model.classifier.bias[3] = 50.0
    path = tmp_path / "always3.pt"
    torch.save(model.state_dict(), path)
    result = evaluate_model(root, path)
    assert result.confusion[:, 3].sum() == 40 and result.confusion.sum() == 40
    assert result.accuracy == pytest.approx(np.mean(labels == 3))
    assert result.per_class_accuracy[3] == 1.0
    assert all(a in (0.0, None) for i, a in enumerate(result.per_class_accuracy) if i != 3)


def test_checkpoints_and_ddp_prefixed_state_dicts_are_accepted(data, model_file, tmp_path):
    root, _ = data
    state = torch.load(model_file, weights_only=True)
    expected = evaluate_model(root, model_file).confusion
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 1, "step": 0}, checkpoint)
    prefixed = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, prefixed)
    assert np.array_equal(evaluate_model(root, checkpoint).confusion, expected)
    assert np.array_equal(evaluate_model(root, prefixed).confusion, expected)


def test_missing_or_bad_model_files_are_named(data, tmp_path):
    root, _ = data
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(InputError, match=f"{missing}: no such model file"):
        evaluate_model(root, missing)
    with pytest.raises(InputError, match="is a directory"):
        evaluate_model(root, tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(InputError, match=f"{garbage}: not a loadable PyTorch state_dict"):
        evaluate_model(root, garbage)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match=str(empty)):
        evaluate_model(root, empty)
    other = tmp_path / "five.pt"
    torch.save(SimpleCNN(5).state_dict(), other)
    with pytest.raises(InputError, match=rf"{other}: does not fit a SimpleCNN for fashion-mnist \(10 classes.*"
                                         r"the model has 5 classes"):
        evaluate_model(root, other)
    not_a_state = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_state)
    with pytest.raises(InputError, match="not a model state_dict"):
        evaluate_model(root, not_a_state)


def test_missing_dataset_or_split_or_bad_batch(data, model_file, tmp_path):
    root, _ = data
    with pytest.raises(DatasetNotFoundError, match="no manifest"):
        evaluate_model(tmp_path / "nothing", model_file)
    with pytest.raises(InputError, match="Invalid split"):
        evaluate_model(root, model_file, split="validation")
    with pytest.raises(InputError, match="batch_size"):
        evaluate_model(root, model_file, batch_size=0)


def test_labels_outside_the_classes_are_rejected(tmp_path, model_file):
    root = tmp_path / "bad"
    write_tiny_dataset(root, labels_fn=lambda n: np.full(n, 12))
    with pytest.raises(DatasetMismatchError, match="labels outside 0..9"):
        evaluate_model(root, model_file)


def test_report_names_classes_and_aligns_the_matrix():
    confusion = np.zeros((10, 10), dtype=np.int64)
    confusion[0, 0], confusion[0, 6], confusion[1, 1], confusion[9, 7] = 120, 3, 1000, 5
    result = result_from_confusion(confusion, CLASSES, dataset="fashion-mnist", split="test")
    assert result.per_class_accuracy[2] is None and result.per_class_accuracy[9] == 0.0
    report = format_report(result)
    assert report.startswith("accuracy: 0.9929 (1120/1128 images, fashion-mnist test)")
    assert "\n0 T-shirt/top " in report and "\n9 Ankle boot " in report
    table = [line for line in report.splitlines() if line.startswith("2 Pullover")]
    assert table[0].split()[-1] == "-"  # no images of that class
    matrix = report.split("confusion matrix")[1].splitlines()[1:]
    assert len(matrix) == 12 and len({len(line) for line in matrix}) == 1  # header, rule, 10 rows, all aligned
    assert matrix[2].split("|")[1].split() == ["120", "0", "0", "0", "0", "0", "3", "0", "0", "0"]


def test_the_model_name_comes_from_training_metrics_or_the_argument(data, model_file):
    root, _ = data
    expected = evaluate_model(root, model_file).confusion
    (model_file.parent / "metrics.json").write_text(json.dumps({"model": "no-such-model"}), encoding="utf-8")
    with pytest.raises(InputError, match=r"Invalid model: 'no-such-model'\. Must be one of 'simple-cnn'"):
        evaluate_model(root, model_file)
    result = evaluate_model(root, model_file, model="simple-cnn")
    assert result.model == "simple-cnn" and np.array_equal(result.confusion, expected)
    (model_file.parent / "metrics.json").write_text(json.dumps({"model": "simple-cnn"}), encoding="utf-8")
    assert np.array_equal(evaluate_model(root, model_file).confusion, expected)
