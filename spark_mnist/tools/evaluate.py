"""Evaluate a saved model on an ingested split: accuracy, per-class accuracy and a confusion matrix.

Runs in one process on the driver (or any machine that sees the dataset directory): no Spark, no process group.
The dataset is read with :class:`spark_mnist.rank.loader.ShardLoader` (world size 1, file order, every row once) and
normalised exactly as training does (:func:`spark_mnist.models.normalization_for` of the manifest's dataset).

The model file is what training writes (``run_dir/model.pt``, a ``SimpleCNN`` ``state_dict``); a training
checkpoint (``checkpoint.pt``, whose ``"model"`` entry is that ``state_dict``) is accepted too.  It is loaded with
``torch.load(..., weights_only=True)``, so an untrusted file cannot run code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from spark_mnist.shards import contract
from spark_mnist.errors import DatasetMismatchError, InputError
from spark_mnist.paths import normalize_uri

DEFAULT_BATCH_SIZE = 1000


@dataclass
class EvaluationResult:
    """The figures of one evaluation.

    ``confusion[i, j]`` counts the images of true class ``i`` predicted as class ``j`` (int64, (C, C)).
    ``per_class_accuracy[i]`` is ``confusion[i, i] / confusion[i].sum()``, ``None`` for a class with no images.
    """

    accuracy: float
    per_class_accuracy: list[float | None]
    confusion: np.ndarray
    classes: list[str]
    samples: int
    dataset: str = ""
    split: str = "test"
    model_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the confusion matrix as nested lists)."""
        return {"dataset": self.dataset, "split": self.split, "model_path": self.model_path,
                "samples": self.samples, "accuracy": self.accuracy, "classes": list(self.classes),
                "per_class_accuracy": list(self.per_class_accuracy), "confusion": self.confusion.tolist()}


def local_dataset_dir(data_dir: str | os.PathLike) -> str:
    """The local (or FUSE) path of a dataset directory given as a path, ``file:``, ``dbfs:/``, ``/dbfs/`` or
    ``/Volumes/``.

    Raises:
        InputError: a place with no local path (an object store, ``dbfs:/`` off Databricks).
    """
    location = normalize_uri(data_dir)
    if location.local_path is None:
        raise InputError(f"{os.fspath(data_dir)}: the dataset must be readable as a local or FUSE path "
                         "(a directory, file:/, /dbfs/ or /Volumes/)")
    return location.local_path


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows the true class, columns the predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    counts = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def result_from_confusion(confusion: np.ndarray, classes: list[str], **extra: Any) -> EvaluationResult:
    """An :class:`EvaluationResult` whose figures all derive from ``confusion``."""
    confusion = np.asarray(confusion, dtype=np.int64)
    samples = int(confusion.sum())
    per_class_total = confusion.sum(axis=1)
    diagonal = np.diag(confusion)
    per_class = [float(d / t) if t else None for d, t in zip(diagonal.tolist(), per_class_total.tolist())]
    accuracy = float(diagonal.sum() / samples) if samples else 0.0
    return EvaluationResult(accuracy=accuracy, per_class_accuracy=per_class, confusion=confusion,
                            classes=list(classes), samples=samples, **extra)


def _load_state_dict(model_path: str):
    import torch

    if not os.path.isfile(model_path):
        what = "is a directory, not a model file" if os.path.isdir(model_path) else "no such model file"
        raise InputError(f"{model_path}: {what}; give the model.pt that `spark-mnist train` wrote in its run_dir")
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds (UnpicklingError, RuntimeError, IndexError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{model_path}: not a loadable PyTorch state_dict ({first})") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a training checkpoint
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{model_path}: holds a {type(state).__name__}, not a model state_dict")
    # A state_dict saved from the DDP wrapper rather than the module.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _build_model(state, model_path: str, num_classes: int, image_shape: tuple[int, int], dataset: str):
    from spark_mnist.models import SimpleCNN

    model = SimpleCNN(num_classes, image_shape)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        bias = state.get("classifier.bias")
        found = f" (the model has {bias.shape[0]} classes)" if bias is not None and bias.dim() == 1 else ""
        detail = str(e).strip().splitlines()
        raise InputError(
            f"{model_path}: does not fit a SimpleCNN for {dataset} ({num_classes} classes, images "
            f"{image_shape[0]}x{image_shape[1]}){found}: {detail[1].strip() if len(detail) > 1 else detail[0]}"
        ) from e
    return model


def evaluate_model(data_dir: str | os.PathLike, model_path: str | os.PathLike, *,
                   batch_size: int = DEFAULT_BATCH_SIZE, split: str = "test",
                   device: "str | torch.device | None" = None) -> EvaluationResult:  # noqa: F821
    """Run the model in ``model_path`` over every image of ``split`` of the dataset in ``data_dir``.

    Args:
        data_dir: an ingested dataset directory (``OUT`` of ``spark-mnist ingest``).
        model_path: a ``SimpleCNN`` ``state_dict`` (``run_dir/model.pt``) or a training checkpoint.
        batch_size: images per forward pass.
        split: ``"test"`` (default) or ``"train"``.
        device: where to run; default CUDA when available, else CPU.
    Returns:
        The :class:`EvaluationResult`.
    Raises:
        DatasetNotFoundError: no complete dataset in ``data_dir``.
        DatasetMismatchError: the split holds no rows, or labels outside the manifest's classes.
        InputError: ``model_path`` missing, unreadable, or not a model for this dataset's classes and image shape;
            an unknown ``split``; ``batch_size`` below 1.
    """
    import torch

    from spark_mnist.rank.loader import ShardLoader
    from spark_mnist.models import normalization_for, normalize

    if batch_size < 1:
        raise InputError(f"Invalid batch_size: {batch_size!r}. Must be at least 1.")
    local = local_dataset_dir(data_dir)
    manifest = contract.load_manifest(local)
    classes = [str(c) for c in manifest["classes"]]
    image_shape = tuple(int(n) for n in manifest["image_shape"])
    dataset = str(manifest.get("dataset", ""))
    try:
        paths = contract.split_files(local, manifest, split)
    except ValueError as e:
        raise InputError(f"{local}: {e}") from e
    model_path = os.fspath(model_path)
    model = _build_model(_load_state_dict(model_path), model_path, len(classes), image_shape, dataset)
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    norm = normalization_for(dataset)
    num_classes = len(classes)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    with torch.no_grad(), ShardLoader(paths, rank=0, world_size=1, batch_size=batch_size, image_shape=image_shape,
                                      shuffle=False, drop_remainder=False,
                                      pin_memory=device.type == "cuda") as loader:
        if loader.total_rows == 0:
            raise DatasetMismatchError(f"{local}: split {split!r} holds no rows")
        for images, labels in loader:
            y = labels.to(device, non_blocking=True)
            if int(y.min()) < 0 or int(y.max()) >= num_classes:
                raise DatasetMismatchError(f"{local}: split {split!r} has labels outside 0..{num_classes - 1}")
            predictions = model(normalize(images.to(device, non_blocking=True), norm)).argmax(1)
            confusion += torch.bincount(y * num_classes + predictions, minlength=num_classes * num_classes)
    return result_from_confusion(confusion.cpu().numpy().reshape(num_classes, num_classes), classes,
                                 dataset=dataset, split=split, model_path=model_path)


def format_report(result: EvaluationResult) -> str:
    """A plain-text report: overall accuracy, a per-class table and the confusion matrix, columns aligned."""
    classes, confusion = result.classes, result.confusion
    correct = int(np.trace(confusion))
    where = f"{result.dataset} {result.split}".strip() or "evaluation"
    lines = [f"accuracy: {result.accuracy:.4f} ({correct}/{result.samples} images, {where})", ""]

    index_width = len(str(len(classes) - 1))
    name_width = max([len("class")] + [index_width + 1 + len(c) for c in classes])
    labels = [f"{i:>{index_width}} {c}" for i, c in enumerate(classes)]
    lines.append(f"{'class':<{name_width}}  {'images':>7}  {'correct':>7}  {'accuracy':>8}")
    for i, label in enumerate(labels):
        accuracy = result.per_class_accuracy[i]
        shown = f"{accuracy:.4f}" if accuracy is not None else "-"
        lines.append(f"{label:<{name_width}}  {int(confusion[i].sum()):>7}  {int(confusion[i, i]):>7}  {shown:>8}")

    lines += ["", "confusion matrix (rows: true class, columns: predicted class index)"]
    cell = max(len(str(int(confusion.max()))) if confusion.size else 1, index_width)
    header = " " * name_width + " |" + "".join(f" {j:>{cell}}" for j in range(len(classes)))
    lines.append(header)
    lines.append("-" * name_width + "-+" + "-" * (len(header) - name_width - 2))
    for i, label in enumerate(labels):
        lines.append(f"{label:<{name_width}} |" + "".join(f" {int(v):>{cell}}" for v in confusion[i]))
    return "\n".join(lines) + "\n"
