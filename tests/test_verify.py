"""spark_mnist.tools.verify: checking a directory of gz IDX files against the registry, without Spark."""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from spark_mnist.datasets import IMAGES, LABELS, SPLITS, DatasetFile, DatasetSpec, get_dataset
from spark_mnist.errors import ChecksumMismatchError, DatasetMismatchError, IdxFormatError, SourceError
from spark_mnist.formats.idx import encode_idx, write_idx
from spark_mnist.tools.verify import format_table, verify_file, verify_source

ROWS = {"train": 30, "test": 20}
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_source(directory: Path, labels_override: dict[str, np.ndarray] | None = None) -> DatasetSpec:
    """Four small MNIST-shaped gz IDX files in ``directory`` and a spec that publishes their hashes."""
    rng = np.random.default_rng(0)
    base = get_dataset("mnist")
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in ROWS.items():
        images = rng.integers(0, 256, size=(rows, 28, 28), dtype=np.uint8)
        labels = (np.arange(rows) % 10).astype(np.uint8)
        labels = (labels_override or {}).get(split, labels)
        files[split] = {}
        for kind, array in ((IMAGES, images), (LABELS, labels)):
            name = base.file(split, kind).name
            write_idx(directory / name, array)
            files[split][kind] = DatasetFile(name, hashlib.sha256(encode_idx(array)).hexdigest())
    return replace(base, name="tiny", files=files, split_sizes=dict(ROWS))


def statuses(report) -> dict[str, str]:
    return {f.name: f.status for f in report.files}


def test_good_directory_is_ok(tmp_path):
    spec = write_source(tmp_path)
    report = verify_source(tmp_path, spec)
    assert report.ok, format_table(report)
    assert set(statuses(report).values()) == {"ok"}
    train_images = report.files[0]
    assert (train_images.name, train_images.rows, train_images.shape) == ("train-images-idx3-ubyte.gz", 30,
                                                                          (30, 28, 28))
    assert train_images.sha256 == train_images.expected
    assert [s.split for s in report.splits] == list(SPLITS)
    assert report.splits[0].histogram == (3,) * 10 and report.splits[1].histogram == (2,) * 10
    table = format_table(report)
    for entry in spec.all_files():
        assert entry.name in table
    assert table.rstrip().endswith("OK")
    assert report.problems == []


def test_uri_spellings_are_accepted(tmp_path):
    spec = write_source(tmp_path)
    assert verify_source(f"file:{tmp_path}", spec).ok
    assert verify_source(f"file://{tmp_path}", spec).ok


def test_missing_file(tmp_path):
    spec = write_source(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    report = verify_source(tmp_path, spec)
    assert not report.ok
    assert statuses(report)["t10k-labels-idx1-ubyte.gz"] == "missing"
    assert report.splits[1].status == "incomplete" and report.splits[0].status == "ok"
    table = format_table(report)
    assert "t10k-labels-idx1-ubyte.gz" in table and "missing" in table and table.rstrip().endswith("FAILED")


def test_bad_magic_and_html(tmp_path):
    spec = write_source(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x01\x08\x01" + bytes(8)))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"<!DOCTYPE html><html>403 Forbidden</html>")
    report = verify_source(tmp_path, spec)
    assert not report.ok
    found = statuses(report)
    assert found["train-labels-idx1-ubyte.gz"].startswith("error: wrong magic number")
    assert "HTML page" in found["t10k-images-idx3-ubyte.gz"]
    assert any("HTML page" in line for line in report.problems)


def test_hash_mismatch_fails_unless_not_strict(tmp_path):
    spec = write_source(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((30, 28, 28), np.uint8))
    report = verify_source(tmp_path, spec)
    assert statuses(report)["train-images-idx3-ubyte.gz"] == "hash-mismatch"
    assert not report.ok
    assert any("differs from tiny's published" in line for line in report.problems)
    assert "hash-mismatch" in format_table(report)
    assert verify_source(tmp_path, spec, strict=False).ok


def test_count_mismatch_is_a_split_error(tmp_path):
    labels = (np.arange(29) % 10).astype(np.uint8)
    spec = write_source(tmp_path, labels_override={"train": labels})
    report = verify_source(tmp_path, spec)
    assert set(statuses(report).values()) == {"ok"}  # each file is what the spec publishes...
    assert not report.ok                              # ...but they do not form a split
    assert report.splits[0].status.startswith("error:") and "counts must match" in report.splits[0].status
    assert report.splits[0].rows == 29 and report.splits[0].expected_rows == 30
    assert "counts must match" in format_table(report)


def test_label_out_of_range_is_a_split_error(tmp_path):
    labels = (np.arange(30) % 10).astype(np.uint8)
    labels[5] = 12
    spec = write_source(tmp_path, labels_override={"train": labels})
    report = verify_source(tmp_path, spec)
    assert not report.ok
    assert "out of tiny's range" in report.splits[0].status
    assert len(report.splits[0].histogram) == 13


def test_directory_errors(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        verify_source(tmp_path / "absent", "mnist")
    with pytest.raises(SourceError, match="local paths only"):
        verify_source("s3://bucket/mnist", "mnist")


def test_verify_file_checks(tmp_path):
    spec = write_source(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    assert verify_file(spec, "train", IMAGES, images).array.shape == (30, 28, 28)
    with pytest.raises(ChecksumMismatchError):
        verify_file(spec, "test", IMAGES, images)
    unpublished = replace(spec, files={**spec.files, "test": {IMAGES: DatasetFile("x.gz"), LABELS: DatasetFile("y")}})
    with pytest.raises(DatasetMismatchError, match="30 rows"):
        verify_file(unpublished, "test", IMAGES, images)
    with pytest.raises(DatasetMismatchError, match="labels of shape"):
        verify_file(unpublished, "test", LABELS, images)
    (tmp_path / "html.gz").write_bytes(b"<html></html>")
    with pytest.raises(IdxFormatError, match="HTML"):
        verify_file(spec, "train", IMAGES, tmp_path / "html.gz")


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian's fashion-mnist package not installed")
def test_real_fashion_mnist_matches_registry():
    report = verify_source(FASHION_DIR, "fashion-mnist")
    assert report.ok, format_table(report)
    assert report.splits[0].histogram == (6000,) * 10
    wrong = verify_source(FASHION_DIR, "mnist")
    assert not wrong.ok and "hash-mismatch" in statuses(wrong).values()
