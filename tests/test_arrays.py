"""Keras-style load_data from gz IDX files, an ingested Parquet dataset and a Keras mnist.npz."""

from __future__ import annotations

import numpy as np
import pytest

import spark_mnist
from spark_mnist.errors import DatasetMismatchError, IdxFormatError, InputError, SourceError
from spark_mnist.formats.idx import write_idx


def check(result, arrays):
    (x_train, y_train), (x_test, y_test) = result
    for (x, y), split in (((x_train, y_train), "train"), ((x_test, y_test), "test")):
        assert x.dtype == np.uint8 and y.dtype == np.uint8 and x.shape[1:] == (28, 28) and y.ndim == 1
        assert np.array_equal(x, arrays[split][0]) and np.array_equal(y, arrays[split][1])


def test_from_gz_files(small_source):
    source, arrays = small_source
    check(spark_mnist.load_data(source, "fashion-mnist"), arrays)


def test_from_keras_npz(tmp_path, small_source):
    _, arrays = small_source
    npz = tmp_path / "mnist.npz"
    np.savez(npz, x_train=arrays["train"][0], y_train=arrays["train"][1], x_test=arrays["test"][0],
             y_test=arrays["test"][1])
    check(spark_mnist.load_data(npz), arrays)
    np.savez(npz, x_train=arrays["train"][0], y_train=arrays["train"][1])
    with pytest.raises(InputError, match="mnist.npz: missing key"):
        spark_mnist.load_data(npz)


def test_same_validation_as_ingest(small_source):
    source, arrays = small_source
    with pytest.raises(SourceError, match="not found"):
        spark_mnist.load_data(source / "nowhere")
    bad = arrays["test"][1].copy()
    bad[0] = 12
    write_idx(source / "t10k-labels-idx1-ubyte.gz", bad)
    with pytest.raises(DatasetMismatchError, match="t10k-labels-idx1-ubyte.gz: label 12 at index 0"):
        spark_mnist.load_data(source)
    (source / "t10k-labels-idx1-ubyte.gz").write_bytes(b"<html>")
    with pytest.raises(IdxFormatError, match="t10k-labels-idx1-ubyte.gz"):
        spark_mnist.load_data(source)


@pytest.mark.slow
def test_from_ingested_parquet_and_npz_ingest(spark, small_source, tmp_path):
    from spark_mnist.driver.ingest import ingest

    source, arrays = small_source
    ingest(spark, str(source), str(tmp_path / "data"), num_shards=3)
    check(spark_mnist.load_data(tmp_path / "data"), arrays)
    npz = tmp_path / "keras" / "mnist.npz"
    npz.parent.mkdir()
    np.savez(npz, x_train=arrays["train"][0], y_train=arrays["train"][1], x_test=arrays["test"][0],
             y_test=arrays["test"][1])
    manifest = ingest(spark, str(npz), str(tmp_path / "from-npz"), dataset="mnist")
    assert manifest.source["files"][0]["kind"] == "npz"
    check(spark_mnist.load_data(tmp_path / "from-npz"), arrays)
