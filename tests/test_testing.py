"""The test kit users install with the wheel (:mod:`spark_mnist.testing`): its factories and ``run_ranks``, with no
Spark.  Its ``spark`` fixture is what every Spark test of this suite runs on; the example of a user's test module
runs against the installed wheel in ``make test-kit``."""

from __future__ import annotations

import os

import numpy as np
import pytest

import spark_mnist
from spark_mnist.datasets import get_dataset, validate_split
from spark_mnist.errors import DatasetMismatchError, IdxFormatError
from spark_mnist.formats.idx import parse_idx
from spark_mnist.testing import DEFECTS, RankFailedError, run_ranks, write_idx_source


def read_idx(source, name=None):
    """The array :func:`parse_idx` reads."""
    return parse_idx(source, name).array


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist", "kmnist", "emnist-letters"])
def test_idx_source_is_valid_for_any_registry_dataset(idx_source, dataset):
    spec = get_dataset(dataset)
    source = idx_source(dataset, train_rows=30, test_rows=7, seed=3)
    assert source.defect is None and source.defect_file is None
    for split, rows in (("train", 30), ("test", 7)):
        images = read_idx(source.file(split, "images"))
        labels = read_idx(source.file(split, "labels"))
        assert images.shape == (rows, *spec.image_shape) and images.dtype == np.uint8
        assert labels.shape == (rows,) and labels.max() < spec.num_classes
        np.testing.assert_array_equal(images, source.arrays[split][0])
        np.testing.assert_array_equal(labels, source.arrays[split][1])


# Each defect and the error that parsing and checking its split gives (what ingest and verify check), by text.
DEFECT_ERRORS = {"truncated": (IdxFormatError, "truncated|gzip|ended"), "html": (IdxFormatError, "HTML"),
                 "wrong-magic": (DatasetMismatchError, "image shape"),
                 "labels-out-of-range": (DatasetMismatchError, "out of mnist's range"),
                 "count-mismatch": (DatasetMismatchError, "counts must match")}


def test_every_defect_is_tested():
    assert set(DEFECT_ERRORS) == set(DEFECTS)


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_each_defect_is_refused_naming_its_file(idx_source, defect):
    spec = get_dataset("mnist")
    source = idx_source("mnist", train_rows=40, test_rows=10, defect=defect, defect_split="test")
    assert source.defect == defect and source.defect_file.parent == source.path
    for split in ("train", "test"):  # the other three files stay valid IDX
        for kind in ("images", "labels"):
            if source.file(split, kind) != source.defect_file:
                read_idx(source.file(split, kind))
    error, text = DEFECT_ERRORS[defect]
    with pytest.raises(error, match=text) as raised:
        images_file, labels_file = source.file("test", "images"), source.file("test", "labels")
        validate_split(spec, read_idx(images_file, images_file.name), read_idx(labels_file, labels_file.name),
                       images_file.name, labels_file.name)
    assert source.defect_file.name in str(raised.value)


def test_unknown_defect_and_split_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Invalid defect: 'bitrot'. Must be one of"):
        write_idx_source(tmp_path / "a", defect="bitrot")
    with pytest.raises(ValueError, match="Invalid defect_split: 'val'"):
        write_idx_source(tmp_path / "b", defect="html", defect_split="val")


def test_ingested_dataset_is_what_ingest_gives_for_the_same_source(ingested_dataset):
    data = ingested_dataset("emnist-letters", train_rows=50, test_rows=11, num_shards=3, seed=5)
    source = write_idx_source(data.parent / "same-source", "emnist-letters", 50, 11, seed=5)
    ds = spark_mnist.open_dataset(data)
    assert (ds.rows("train"), ds.rows("test")) == (50, 11) and len(ds.files("train")) == 3
    assert ds.image_shape == (28, 28)
    images, labels = spark_mnist.load_data(data, "emnist-letters")[0]
    np.testing.assert_array_equal(labels, source.arrays["train"][1])
    np.testing.assert_array_equal(images, source.arrays["train"][0].transpose(0, 2, 1))  # EMNIST turned upright


def _rank_facts(offset: int) -> dict:
    import torch
    import torch.distributed as dist

    total = torch.tensor([dist.get_rank() + offset])
    dist.all_reduce(total)
    return {key: os.environ[key] for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} | {
        "sum": int(total)}


def _rank_fails() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank one is broken")


@pytest.mark.slow
@pytest.mark.one_lane
def test_run_ranks_runs_a_group_with_torchruns_environment_and_leaves_ours_alone():
    before = dict(os.environ)
    facts = run_ranks(_rank_facts, 3, 10)
    assert [f["RANK"] for f in facts] == ["0", "1", "2"] and {f["WORLD_SIZE"] for f in facts} == {"3"}
    assert [f["sum"] for f in facts] == [33, 33, 33]  # 10 + 11 + 12, all-reduced over gloo
    assert dict(os.environ) == before


@pytest.mark.slow
def test_run_ranks_reports_the_failed_rank_with_its_traceback():
    with pytest.raises(RankFailedError, match=r"(?s)rank 1 of 2 failed: ValueError: rank one is broken.*_rank_fails"):
        run_ranks(_rank_fails, 2)
