"""Evaluate a saved model on an ingested split: accuracy, per-class accuracy and a confusion matrix.

Runs in one process on the driver (or any machine that sees the dataset directory): no Spark, no process group.
The dataset is read through its manifest (:func:`spark_mnist.shards.contract.open_dataset`), every row once in file
order (:func:`spark_mnist.shards.parquet.iter_batches`, torch-free), and normalised exactly as training does
(:func:`spark_mnist.models.normalization_for` of the manifest's dataset).

The model file is what training writes (``run_dir/model.pt``, the ``state_dict`` of the model ``train.model`` names,
which ``run_dir/metrics.json`` records as ``"model"``); a training checkpoint (``checkpoint.pt``, whose ``"model"``
entry is that ``state_dict``) is accepted too.  It is loaded with ``torch.load(..., weights_only=True)``, so an
untrusted file cannot run code.  The model is built by name (:func:`spark_mnist.models.build_model`).
"""

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from spark_mnist.errors import DatasetMismatchError, InputError, invalid
from spark_mnist.runs import METRICS_NAME  # training's metrics beside model.pt
from spark_mnist.shards.parquet import iter_batches, open_split

__all__ = ["EvaluationResult", "result_from_confusion", "evaluate_model", "format_report"]


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
    dataset: str
    split: str
    model: str = ""


def result_from_confusion(confusion: np.ndarray, classes: Sequence[str], **extra: Any) -> EvaluationResult:
    """An :class:`EvaluationResult` whose figures all derive from ``confusion``."""
    confusion = np.asarray(confusion, dtype=np.int64)
    samples, correct, totals = int(confusion.sum()), np.diag(confusion).tolist(), confusion.sum(axis=1).tolist()
    per_class = [c / t if t else None for c, t in zip(correct, totals)]
    return EvaluationResult(sum(correct) / max(samples, 1), per_class, confusion, list(classes), samples, **extra)


def evaluate_model(
    data_dir: str | os.PathLike,
    model_path: str | os.PathLike,
    *,
    batch_size: int = 1000,
    split: str = "test",
    model: str | None = None,
) -> EvaluationResult:
    """Run the model in ``model_path`` over every image of ``split`` of the dataset in ``data_dir``, on CUDA when
    available, else on the CPU.

    Args:
        data_dir: an ingested dataset directory (``OUT`` of ``spark-mnist ingest``).
        model_path: a model ``state_dict`` (``run_dir/model.pt``) or a training checkpoint.
        batch_size: images per forward pass.
        split: ``"test"`` (default) or ``"train"``.
        model: the model's registry name (:data:`spark_mnist.models.MODELS`); default the one training recorded
            as ``"model"`` in the ``metrics.json`` beside ``model_path``, else :data:`spark_mnist.models.DEFAULT_MODEL`.
    Returns:
        The :class:`EvaluationResult`.
    Raises:
        DatasetNotFoundError: no complete dataset in ``data_dir``.
        DatasetMismatchError: the split holds no rows, or labels outside the manifest's classes.
        SourceError: ``data_dir`` is on no file system this machine reaches (:func:`spark_mnist.fs.filesystem`).
        InputError: ``model_path`` missing, unreadable, or not a model for this dataset's classes and image shape;
            an unknown ``model`` or ``split``; ``batch_size`` below 1.
    """
    # torch (and models, which imports it): the torch extra; the CLI imports this module for its torch-free commands.
    import torch
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    from spark_mnist.models import DEFAULT_MODEL, build_model, normalization_for, normalize

    if batch_size < 1:
        raise invalid("batch_size", batch_size, "at least 1", InputError)
    opened, plan = open_split(data_dir, split)
    local, dataset, image_shape = opened.location.shown, opened.dataset, opened.image_shape
    try:  # the model training recorded beside model.pt; runs from before models had names recorded none
        with open(os.path.join(os.path.dirname(os.path.abspath(model_path)), METRICS_NAME), encoding="utf-8") as f:
            recorded = json.load(f).get("model")
    except (OSError, ValueError, AttributeError):  # no file, not JSON, not a JSON object
        recorded = None
    model = model or (recorded if isinstance(recorded, str) else None) or DEFAULT_MODEL
    num_classes = len(opened.classes)
    if not os.path.isfile(model_path):
        what = "is a directory, not a model file" if os.path.isdir(model_path) else "no such model file"
        raise InputError(f"{model_path}: {what}; give the model.pt that `spark-mnist train` wrote in its run_dir")
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{model_path}: not a loadable PyTorch state_dict ({first})") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a training checkpoint
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{model_path}: holds a {type(state).__name__}, not a model state_dict")
    consume_prefix_in_state_dict_if_present(state, "module.")  # saved from the DDP wrapper rather than the module
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = build_model(model, num_classes, image_shape).to(device).eval()
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        bias = state.get("classifier.bias")
        found = f" (the model has {bias.shape[0]} classes)" if bias is not None and bias.dim() == 1 else ""
        detail = str(e).strip().splitlines()
        raise InputError(
            f"{model_path}: does not fit a {type(network).__name__} for {dataset} ({num_classes} classes, images "
            f"{image_shape[0]}x{image_shape[1]}){found}: {detail[1].strip() if len(detail) > 1 else detail[0]}"
        ) from e
    norm = normalization_for(dataset)
    # (C, C) int64 counts, rows the true class: the labels are checked on the host and the counts summed on
    # ``device``, read back once at the end (no device synchronisation per batch).
    counts = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
    with torch.no_grad():
        for x, y in iter_batches(plan, batch_size, int(np.prod(image_shape))):
            if int(y.min()) < 0 or int(y.max()) >= num_classes:
                raise DatasetMismatchError(f"{local}: split {split!r} has labels outside 0..{num_classes - 1}")
            images = torch.from_numpy(x).view(-1, 1, *image_shape).to(device, non_blocking=True)
            labels = torch.from_numpy(y).to(device, non_blocking=True)
            predictions = network(normalize(images, norm)).argmax(1)
            counts += torch.bincount(labels * num_classes + predictions, minlength=counts.numel()).view_as(counts)
    return result_from_confusion(counts.cpu().numpy(), opened.classes, dataset=dataset, split=split, model=model)


def format_report(result: EvaluationResult) -> str:
    """A plain-text report: overall accuracy, a per-class table and the confusion matrix, columns aligned."""
    confusion, where = result.confusion, f"{result.dataset} {result.split}"
    lines = [f"accuracy: {result.accuracy:.4f} ({np.trace(confusion)}/{result.samples} images, {where})", ""]
    index_width = len(str(len(result.classes) - 1))
    labels = [f"{i:>{index_width}} {c}" for i, c in enumerate(result.classes)]
    width = max(len("class"), *map(len, labels))
    lines.append(f"{'class':<{width}}  {'images':>7}  {'correct':>7}  {'accuracy':>8}")
    for i, (label, accuracy) in enumerate(zip(labels, result.per_class_accuracy)):
        shown = "-" if accuracy is None else f"{accuracy:.4f}"
        lines.append(f"{label:<{width}}  {confusion[i].sum():>7}  {confusion[i, i]:>7}  {shown:>8}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted class index)"]
    cell = max(len(str(confusion.max())), index_width)
    header = " " * width + " |" + "".join(f" {j:>{cell}}" for j in range(len(labels)))
    lines += [header, "-" * width + "-+" + "-" * (len(header) - width - 2)]
    lines += [f"{label:<{width}} |" + "".join(f" {v:>{cell}}" for v in row) for label, row in zip(labels, confusion)]
    return "\n".join(lines) + "\n"
