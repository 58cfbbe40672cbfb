"""The contract between the driver and the ranks: what a training job is, and how a failed rank reports.

The driver (:func:`spark_mnist.pipeline.train`) builds one :class:`TrainJob` and ``TorchDistributor`` hands it
to :func:`spark_mnist.rank.train.train_worker` in every rank.  Every setting comes from one
:class:`~spark_mnist.config.TrainSettings` object, carried whole: no default is restated here.  Beside it the job
carries the facts only the driver can derive (the files of each split, the dataset's classes and image shape, the
local run directory, petastorm's converter).

A rank that fails leaves ``run_dir/_errors/rank-N.json`` (:func:`write_error_report`), which the driver reads to
name the rank, its exception and its traceback's tail (:func:`read_error_reports`).

Importable anywhere: no torch, no Spark.
"""

from __future__ import annotations

import json
import os
import shutil
import traceback
from dataclasses import dataclass, field
from typing import Any

from spark_mnist.config import TrainSettings

MIB = 2**20
ERRORS_DIR = "_errors"
TRACEBACK_LINES = 12


@dataclass
class TrainJob:
    """Everything a rank needs, picklable.

    Attributes:
        settings: the run's ``train`` settings (epochs, batch size, lr, seed, model, loader, ...), read by the ranks.
        train_files, test_files: the splits' Parquet files, local paths or ``file:``/``dbfs:`` URLs (the ingested
            shards, or petastorm's converter cache).
        dataset: the registry name of the ingested dataset (picks the normalisation constants).
        num_classes: classes of the dataset (the model's outputs).
        image_shape: (H, W) of the images, in pixels.
        run_dir: the local (or FUSE) path of ``settings.run_dir``; receives ``model.pt``, ``checkpoint.pt`` and
            ``metrics.json`` (rank 0) and the ranks' error reports.
        train_converter: petastorm's converter of the training split when ``settings.loader`` is ``petastorm``.
    """

    settings: TrainSettings
    train_files: list[str]
    test_files: list[str]
    dataset: str
    num_classes: int
    image_shape: tuple[int, int]
    run_dir: str
    train_converter: Any = field(default=None, repr=False)

    @property
    def memory_budget_bytes(self) -> int:
        """``settings.memory_budget_mb`` in bytes: a rank keeps its decoded shard in memory when it fits."""
        return self.settings.memory_budget_mb * MIB

    def summary(self) -> dict[str, Any]:
        """The job for logging: the settings and the derived facts, without file lists or converters."""
        return {**self.settings.dict(), "dataset": self.dataset, "num_classes": self.num_classes,
                "image_shape": tuple(self.image_shape), "run_dir": self.run_dir,
                "train_files": len(self.train_files), "test_files": len(self.test_files)}


def write_error_report(run_dir: str, rank: int, error: BaseException) -> None:
    """Leave ``run_dir/_errors/rank-N.json`` (``rank``, ``exception``: "Type: message", ``traceback``: its last
    :data:`TRACEBACK_LINES` lines) for the driver to report.  Runs in a failing rank; never raises (the original
    error matters more than its report)."""
    try:
        os.makedirs(os.path.join(run_dir, ERRORS_DIR), exist_ok=True)
        lines = traceback.format_exception(type(error), error, error.__traceback__)
        report = {"rank": rank, "exception": f"{type(error).__name__}: {error}",
                  "traceback": lines[-TRACEBACK_LINES:]}
        with open(os.path.join(run_dir, ERRORS_DIR, f"rank-{rank}.json"), "w", encoding="utf-8") as f:
            json.dump(report, f)
    except OSError:
        pass


def read_error_reports(run_dir: str) -> list[dict[str, Any]]:
    """The reports :func:`write_error_report` left in ``run_dir``, by rank; ``[]`` when there are none.  Driver-side."""
    directory = os.path.join(run_dir, ERRORS_DIR)
    if not os.path.isdir(directory):
        return []
    reports = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            reports.append(json.load(f))
    return reports


def clear_error_reports(run_dir: str) -> None:
    """Remove earlier runs' reports from ``run_dir`` before a new run.  Driver-side."""
    shutil.rmtree(os.path.join(run_dir, ERRORS_DIR), ignore_errors=True)
