"""Pictures: a grid of sample images, training curves and a confusion matrix, as PNG files.

matplotlib is optional (``pip install 'spark-mnist[plots]'``) and imported only when a picture is drawn.  Figures are
built with the object API (``matplotlib.figure.Figure``, which ``savefig`` renders with Agg), never through
``pyplot``: nothing is registered in pyplot's global figure list, the process-wide backend is left as it is (a notebook
keeps its inline backend), no display is needed, and nothing holds a figure once the function returns.  Every PNG is
written through a temporary name and a rename (:func:`spark_mnist.fs.replacing`), so a reader never sees half a file.
"""

import logging
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from spark_mnist.errors import InputError, require_extra
from spark_mnist.fs import replacing
from spark_mnist.shards import contract
from spark_mnist.shards.parquet import open_split, read_pieces, total_rows
from spark_mnist.tools.evaluate import EvaluationResult

__all__ = ["sample_rows", "preview_grid", "training_curves", "confusion_matrix_png", "maybe_training_curves"]

log = logging.getLogger(__name__)


def _figure(width: float, height: float, layout: Literal["compressed", "constrained", "tight"]):
    """A new figure, not known to pyplot; :class:`~spark_mnist.errors.EnvironmentMismatchError` (an
    :class:`~spark_mnist.errors.InputError`) with the install hint where matplotlib is missing."""
    figure = require_extra("matplotlib.figure", "plots", "drawing pictures")  # the plots extra, imported when drawing
    return figure.Figure(figsize=(width, height), dpi=100, layout=layout)  # 100 pixels an inch


def _save(figure, out_png: str | os.PathLike) -> Path:
    """Write ``figure`` as PNG to ``out_png`` (parents created) atomically."""
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        figure.savefig(tmp, format="png", dpi="figure")  # the figure's own, whatever savefig.dpi says
    return path


def sample_rows(
    data_dir: str | os.PathLike, split: str = "train", count: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, "contract.Manifest"]:
    """``count`` distinct random rows of ``split`` (all of them when the split is smaller), decoding only the row
    groups that hold them (at most ``count`` of them, ~1 MiB each, read together).

    Returns:
        ``(index (n,) int64, images (n, H, W) uint8, labels (n,) int64, manifest)``, in sampled order.
    Raises:
        DatasetNotFoundError: no complete dataset in ``data_dir`` (local, FUSE or an object store:
            :func:`spark_mnist.shards.contract.open_dataset`).
        InputError: an unknown ``split``.
        DatasetMismatchError: an empty split.
    """
    dataset, plan = open_split(data_dir, split)
    row_bytes, total = int(np.prod(dataset.image_shape)), total_rows(plan)
    chosen = np.random.default_rng(seed).choice(total, size=min(count, total), replace=False).astype(np.int64)
    groups = [g for g in plan if np.any((chosen >= g.start) & (chosen < g.start + g.rows))]
    index, images, labels = read_pieces([(g, g.start, g.start + g.rows) for g in groups], row_bytes)
    # Each chosen row's place among the rows read: the global rows of the groups read, in ascending order.
    at = np.searchsorted(np.concatenate([np.arange(g.start, g.start + g.rows) for g in groups]), chosen)
    return index[at], images[at].reshape(-1, *dataset.image_shape), labels[at], dataset.manifest


def preview_grid(
    data_dir: str | os.PathLike, out_png: str | os.PathLike, *, split: str = "train", seed: int = 0
) -> Path:
    """Draw 32 random images of ``split`` (4 rows of 8) in grayscale, each titled with its class name.

    The PNG is 1040 by 620 pixels.  The same ``seed`` always draws the same images.

    Returns:
        The path written.
    Raises:
        DatasetNotFoundError: no complete dataset in ``data_dir``.
        InputError: matplotlib missing, an unknown ``split``.
        DatasetMismatchError: an empty split.
    """
    rows, cols = 4, 8
    _, images, labels, manifest = sample_rows(data_dir, split, rows * cols, seed)
    # Inches: 1.3 x 1.45 for each image with its title, 0.4 for the figure's title.
    figure = _figure(cols * 1.3, rows * 1.45 + 0.4, "compressed")
    figure.suptitle(f"{manifest.dataset} {split}: {len(labels)} random images (seed {seed})", fontsize=11)
    fontsize = 9 if max(len(c) for c in manifest.classes) <= 12 else 7
    for k, axes in enumerate(figure.subplots(rows, cols, squeeze=False).flat):
        axes.set_axis_off()
        if k < len(labels):
            axes.imshow(images[k], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            axes.set_title(manifest.classes[labels[k]], fontsize=fontsize, pad=3)
    return _save(figure, out_png)


def training_curves(history: Sequence[Mapping[str, Any]], out_png: str | os.PathLike) -> Path:
    """Two panels: train and test loss per epoch; test accuracy per epoch.

    Args:
        history: the ``"history"`` list of training's metrics (dicts with ``epoch``, ``train_loss``, ``test_loss``,
            ``test_accuracy``).
    Returns:
        The path written.
    Raises:
        InputError: matplotlib missing, an empty history.
    """
    if not history:
        raise InputError("no epochs to plot: the training history is empty")
    figure = _figure(10, 4, "tight")
    # A figure missing from an epoch (None) is a gap in its line (NaN).
    figures = [[h["epoch"], *(h.get(k) for k in ("train_loss", "test_loss", "test_accuracy"))] for h in history]
    epochs, train_loss, test_loss, accuracy = np.array(figures, dtype=float).T
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, train_loss, marker="o", label="train loss")
    loss_axes.plot(epochs, test_loss, marker="s", label="test loss")
    loss_axes.set(title="Loss per epoch", xlabel="epoch", ylabel="cross-entropy")
    accuracy_axes.plot(epochs, accuracy, marker="o", color="tab:green", label="test accuracy")
    accuracy_axes.set(title="Test accuracy per epoch", xlabel="epoch", ylabel="accuracy")
    if not np.isnan(accuracy[-1]):
        below = {"textcoords": "offset points", "xytext": (0, -14), "ha": "center", "fontsize": 9}
        accuracy_axes.annotate(f"{accuracy[-1]:.4f}", (epochs[-1], accuracy[-1]), **below)
    for axes, corner in ((loss_axes, "best"), (accuracy_axes, "lower right")):
        axes.legend(loc=corner)
        axes.locator_params(axis="x", integer=True)  # whole epochs only
        axes.grid(alpha=0.3)
    return _save(figure, out_png)


def confusion_matrix_png(result: EvaluationResult, out_png: str | os.PathLike) -> Path:
    """The confusion matrix as a heat map (colour: share of each true class's images), with counts written in the
    cells when there are at most 20 classes.

    Returns:
        The path written.
    Raises:
        InputError: matplotlib missing.
    """
    confusion, n = result.confusion, len(result.confusion)  # int64 counts (:func:`result_from_confusion`)
    shares = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)  # a class with no images: all 0
    side = min(24.0, max(6.0, 0.55 * n + 3))
    figure = _figure(side + 1.2, side, "constrained")
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true class")
    if n <= 20:  # up to 20 classes: indices below, "index name" on the left, the counts in the cells
        axes.set_xticks(range(n), labels=[str(i) for i in range(n)], fontsize=9)
        axes.set_yticks(range(n), labels=[f"{i} {c}" for i, c in enumerate(result.classes)], fontsize=9)
        for i, j in zip(*np.nonzero(confusion)):
            color = "white" if shares[i, j] > 0.5 else "black"
            axes.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=8, color=color)
    else:
        axes.set_xticks(range(n), labels=result.classes, fontsize=6)
        axes.set_yticks(range(n), labels=result.classes, fontsize=6)
    axes.set(xlabel="predicted class", ylabel="true class")
    title = f"{result.dataset} {result.split}: accuracy {result.accuracy:.4f} on {result.samples} images"
    axes.set_title(f"Confusion matrix - {title}", fontsize=11)
    return _save(figure, out_png)


def maybe_training_curves(history: Sequence[Mapping[str, Any]], out_png: str | os.PathLike) -> Path | None:
    """:func:`training_curves` for the end of a training run, which a picture must never fail: returns ``None``
    and logs a warning (the missing matplotlib with its install hint, an empty history, ...) instead of raising."""
    try:
        return training_curves(history, out_png)
    except Exception as e:  # noqa: BLE001 - the model and metrics are already saved; a picture is not worth a failure
        log.warning("not writing %s: %s: %s", out_png, type(e).__name__, e)
        return None
