"""Spark ingest: round trip, manifest, atomic replacement, races, determinism, bad input leaves nothing, what killed
ingests leave is never part of the dataset and is removed by the next ingest."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from spark_mnist.paths import normalize_uri
from spark_mnist.shards import commit, contract
from spark_mnist.errors import ChecksumMismatchError, DatasetMismatchError, IdxFormatError, SourceError
from spark_mnist.formats.idx import write_idx
from spark_mnist.driver.ingest import ingest
from spark_mnist.shards.contract import shard_bounds

pytestmark = [pytest.mark.slow, pytest.mark.connect]


def read_split(out, split):
    """(index, images (n, 784) uint8, labels) of a split, in shard order, and the per-shard row counts."""
    tables = [pq.read_table(p) for p in contract.open_dataset(out).paths(split)]
    index = np.concatenate([t.column("index").to_numpy() for t in tables])
    images = np.stack([np.frombuffer(b, dtype=np.uint8) for t in tables for b in t.column("image").to_pylist()])
    labels = np.concatenate([t.column("label").to_numpy() for t in tables])
    return index, images, labels, [t.num_rows for t in tables]


def test_round_trip_byte_for_byte(spark, small_source, tmp_path):
    source, arrays = small_source
    out = tmp_path / "out"
    manifest = ingest(spark, str(source), str(out), num_shards=4, row_group_bytes=64 * 784)
    for split, (images, labels) in arrays.items():
        index, pixels, got_labels, rows = read_split(out, split)
        assert np.array_equal(index, np.arange(len(labels)))
        assert np.array_equal(pixels, images.reshape(len(images), -1))
        assert np.array_equal(got_labels, labels)
        info = manifest.splits[split]
        assert info.rows == len(labels) and sum(rows) == len(labels) == sum(f.rows for f in info.files)
        assert rows == [f.rows for f in info.files] and len(rows) == 4
        assert list(info.label_histogram) == np.bincount(labels, minlength=10).tolist()
        for k, shard in enumerate(info.files):  # path relative to OUT, under the generation; bytes as on disk
            assert shard.path == f"{manifest.generation}/{split}/part-{k:05d}.parquet"
            assert (out / shard.path).stat().st_size == shard.bytes
    train_files = contract.open_dataset(out).paths("train")
    schema = pq.read_schema(train_files[0])
    assert [str(schema.field(c).type) for c in contract.COLUMNS] == ["int64", "binary", "int32"]
    metadata = pq.ParquetFile(train_files[0]).metadata
    assert metadata.num_row_groups >= 2  # 150 rows at ~64 rows per row group
    on_disk = json.loads((out / contract.MANIFEST_NAME).read_text())
    assert on_disk == manifest.to_dict()
    assert on_disk["schema_version"] == contract.SCHEMA_VERSION == 2 and manifest.package_version
    assert manifest.dataset == "fashion-mnist" and manifest.previous is None
    assert sorted(p.name for p in out.iterdir()) == [manifest.generation, contract.MANIFEST_NAME]
    files = manifest.source["files"]
    assert len(files) == 4 and all(f["bytes"] > 0 and len(f["sha256"]) == 64 and f["uri"] for f in files)
    assert {f["sha256_matches"] for f in files} == {False}  # synthetic data differs from the published payloads


def test_hash_mismatch_warns_and_strict_refuses(spark, small_source, tmp_path, caplog):
    source, _ = small_source
    with caplog.at_level("WARNING", logger="spark_mnist"):
        ingest(spark, str(source), str(tmp_path / "lenient"))
    assert "train-images-idx3-ubyte.gz: payload sha256" in caplog.text
    with pytest.raises(ChecksumMismatchError, match="train-images-idx3-ubyte.gz.*differs"):
        ingest(spark, str(source), str(tmp_path / "strict"), strict=True)
    assert not (tmp_path / "strict").exists()


def _shards(out: Path, manifest) -> dict:
    """Each shard's table by its path inside the generation (``train/part-00000.parquet``)."""
    return {f.path.split("/", 1)[1]: pq.read_table(out / f.path) for f in manifest.files()}


def test_reingest_replaces_atomically_and_is_deterministic(spark, small_source, tmp_path):
    source, _ = small_source
    out = tmp_path / "out"
    first_manifest = ingest(spark, str(source), str(out), num_shards=3)
    first = {s: read_split(out, s) for s in ("train", "test")}
    shard_bytes = _shards(out, first_manifest)
    manifest = ingest(spark, str(source), str(out), num_shards=3)
    for split in ("train", "test"):
        for a, b in zip(first[split], read_split(out, split)):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    assert _shards(out, manifest) == shard_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "source"]  # nothing beside OUT
    # retention: the new generation and the one it replaced, which a reader of the previous manifest goes on reading
    assert manifest.previous == first_manifest.generation != manifest.generation
    assert sorted(p.name for p in out.iterdir()) == sorted([first_manifest.generation, manifest.generation,
                                                           contract.MANIFEST_NAME])
    for split in ("train", "test"):  # nothing in the generation but the shards the manifest names
        assert sorted(p.name for p in (out / manifest.generation / split).iterdir()) == [
            f.path.rsplit("/", 1)[1] for f in manifest.splits[split].files]
    third = ingest(spark, str(source), str(out), num_shards=3)
    assert third.previous == manifest.generation
    # the generation no manifest names any more stays until it is older than the retention, or gc removes it
    assert sorted(p.name for p in out.iterdir()) == sorted([first_manifest.generation, manifest.generation,
                                                           third.generation, contract.MANIFEST_NAME])
    assert commit.clean(normalize_uri(str(out)), older_than=0) == [first_manifest.generation]
    assert sorted(p.name for p in out.iterdir()) == sorted([manifest.generation, third.generation,
                                                           contract.MANIFEST_NAME])


def test_shard_written_whole_or_not_at_all(tmp_path):
    from spark_mnist.shards.parquet import write_shard

    images, labels = np.zeros((10, 28, 28), dtype=np.uint8), np.arange(10, dtype=np.uint8)
    size = write_shard(str(tmp_path), contract.shard_path("g", "train", 3), images, labels, start=20,
                       rows_per_group=4)
    assert [p.name for p in (tmp_path / "g" / "train").iterdir()] == ["part-00003.parquet"]
    assert size == (tmp_path / "g" / "train" / "part-00003.parquet").stat().st_size
    shard = pq.ParquetFile(tmp_path / "g" / "train" / "part-00003.parquet")
    assert [shard.metadata.row_group(i).num_rows for i in range(shard.metadata.num_row_groups)] == [4, 4, 2]
    assert shard.read().column("index").to_pylist() == list(range(20, 30))
    with pytest.raises(ValueError):  # images and labels disagree: nothing appears under the shard's name
        write_shard(str(tmp_path), contract.shard_path("g", "train", 4), images[:5], labels, start=0,
                    rows_per_group=4)
    assert [p.name for p in (tmp_path / "g" / "train").iterdir()] == ["part-00003.parquet"]  # no partial file


def test_output_pyarrow_cannot_write_is_refused_before_reading(spark, small_source, tmp_path):
    """wasbs:// has no pyarrow file system in any version (abfss:// has one from pyarrow 16 or so on)."""
    source, _ = small_source
    with pytest.raises(SourceError, match="wasbs://c@a.blob.core.windows.net/out.*cannot write Parquet shards"):
        ingest(spark, str(source), "wasbs://c@a.blob.core.windows.net/out")


@pytest.mark.parametrize("defect", ["missing", "magic", "truncated", "counts", "labels"])
def test_bad_input_writes_nothing(spark, small_source, tmp_path, defect):
    source, arrays = small_source
    out = tmp_path / "out"
    ingest(spark, str(source), str(out))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    labels_file = source / "train-labels-idx1-ubyte.gz"
    if defect == "missing":
        labels_file.unlink()
        error, match = SourceError, "train-labels-idx1-ubyte.gz.*not found"
    elif defect == "magic":
        labels_file.write_bytes(b"\x08\x08\x08\x01" + bytes(10))
        error, match = IdxFormatError, "train-labels-idx1-ubyte.gz.*magic"
    elif defect == "truncated":
        data = (source / "train-images-idx3-ubyte.gz").read_bytes()
        (source / "train-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
        error, match = IdxFormatError, "train-images-idx3-ubyte.gz.*truncated"
    elif defect == "counts":
        write_idx(labels_file, arrays["train"][1][:-1])
        error, match = DatasetMismatchError, "train-labels-idx1-ubyte.gz.*labels for"
    else:
        bad = arrays["train"][1].copy()
        bad[3] = 10
        write_idx(labels_file, bad)
        error, match = DatasetMismatchError, "train-labels-idx1-ubyte.gz.*label 10 at index 3"
    with pytest.raises(error, match=match):
        ingest(spark, str(source), str(out))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "source"]


def test_failure_mid_write_keeps_previous_dataset(spark, small_source, tmp_path, monkeypatch):
    source, arrays = small_source
    out = tmp_path / "out"
    ingest(spark, str(source), str(out))
    import spark_mnist.driver.ingest as ingest_module

    real_write = ingest_module.write_pieces

    def writes_then_dies(*args, **kwargs):
        real_write(*args, **kwargs)  # the shards are in staging when the failure comes
        raise RuntimeError("executor lost")

    monkeypatch.setattr(ingest_module, "write_pieces", writes_then_dies)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(RuntimeError, match="executor lost"):
        ingest(spark, str(source), str(out))
    assert np.array_equal(read_split(out, "train")[2], arrays["train"][1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "source"]
    assert sorted(p.name for p in out.iterdir()) == before  # the failed generation is gone


def test_leftovers_of_killed_ingests_are_ignored_then_removed(spark, small_source, tmp_path, caplog):
    """What a killed ingest or task attempt leaves (a generation no manifest names, a stray file in the current
    generation) is never read, and the next ingest removes the generation once it is older than the retention."""
    source, arrays = small_source
    out = tmp_path / "out"
    first = ingest(spark, str(source), str(out), num_shards=2)
    started = datetime.now(timezone.utc) - timedelta(seconds=2 * commit.RETENTION_S)
    killed = out / f"{started.strftime(commit.GENERATION_TIME)}_0123456789ab"
    (killed / "train").mkdir(parents=True)
    (killed / "train" / "part-00000.parquet").write_bytes(b"PAR1")  # half written, then SIGKILL
    (out / first.generation / "train" / "part-00007.parquet").write_bytes(b"PAR1")  # a stray file: not named
    for split, (images, labels) in arrays.items():
        index, pixels, got_labels, _ = read_split(out, split)
        assert np.array_equal(index, np.arange(len(labels)))
        assert np.array_equal(pixels, images.reshape(len(images), -1))
        assert np.array_equal(got_labels, labels)
    with caplog.at_level("INFO", logger="spark_mnist"):
        manifest = ingest(spark, str(source), str(out), num_shards=2)
    assert f"removed 1 generation(s) no manifest needs: {killed.name}" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == sorted([first.generation, manifest.generation,
                                                           contract.MANIFEST_NAME])
    assert np.array_equal(read_split(out, "train")[2], arrays["train"][1])


def test_racing_ingests_leave_one_complete_dataset(spark, tmp_path):
    from tests.conftest import write_dataset

    sources = [tmp_path / "a", tmp_path / "b"]
    expected = [write_dataset(s, train_rows=300, test_rows=50, seed=i * 10) for i, s in enumerate(sources)]
    out = tmp_path / "out"
    errors = []

    def run(source):
        try:
            ingest(spark, str(source), str(out), num_shards=2)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    labels = read_split(out, "train")[2]
    winner = [i for i, arrays in enumerate(expected) if np.array_equal(labels, arrays["train"][1])]
    assert len(winner) == 1
    assert np.array_equal(read_split(out, "test")[2], expected[winner[0]]["test"][1])  # never a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]


def test_plan_jobs_packs_splits_within_the_chunk():
    from spark_mnist.driver.write_job import plan_jobs

    bounds, jobs = plan_jobs({"train": 60_000, "test": 10_000}, 2, 1_000_000)
    assert jobs == [[("train", 0, 2), ("test", 0, 2)]]  # MNIST-sized: one Spark job
    bounds, jobs = plan_jobs({"train": 600, "test": 100}, 2, 250)
    assert len(bounds["train"]) - 1 == 3 and all(np.diff(bounds["train"]) <= 250)
    assert jobs == [[("train", 0, 1)], [("train", 1, 2)], [("train", 2, 3)], [("test", 0, 2)]]


def test_shard_bounds_contiguous_and_balanced():
    assert shard_bounds(10, 3).tolist() == [0, 3, 7, 10]
    assert shard_bounds(2, 8).tolist() == [0, 1, 2]  # never an empty shard
    sizes = np.diff(shard_bounds(60_000, 7))
    assert sizes.max() - sizes.min() <= 1


def test_streamed_ingest_in_chunks_matches_source(spark, small_source, tmp_path):
    source, arrays = small_source
    out = tmp_path / "out"
    manifest = ingest(spark, str(source), str(out), num_shards=2, chunk_rows=100)
    info = manifest.splits["train"]
    assert len(info.files) == 6 and max(f.rows for f in info.files) <= 100  # shards raised to fit the chunk
    for split, (images, labels) in arrays.items():
        index, pixels, got_labels, _ = read_split(out, split)
        assert np.array_equal(index, np.arange(len(labels)))
        assert np.array_equal(pixels, images.reshape(len(images), -1))
        assert np.array_equal(got_labels, labels)
    records = {(r["split"], r["kind"]): r for r in manifest.source["files"]}
    import hashlib
    import gzip

    expected = hashlib.sha256(gzip.decompress((source / "train-images-idx3-ubyte.gz").read_bytes())).hexdigest()
    assert records[("train", "images")]["sha256"] == expected


def test_defect_late_in_a_streamed_file_leaves_nothing(spark, small_source, tmp_path):
    import gzip

    source, _ = small_source
    path = source / "train-images-idx3-ubyte.gz"
    payload = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(payload[:-784 * 50]))  # the last 50 images are missing
    with pytest.raises(IdxFormatError, match="train-images-idx3-ubyte.gz: truncated payload"):
        ingest(spark, str(source), str(tmp_path / "out"), num_shards=2, chunk_rows=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_large_local_files_are_streamed_from_their_path(spark, small_source, monkeypatch):
    from spark_mnist.driver import inputs
    from spark_mnist.paths import normalize_uri

    source, _ = small_source
    monkeypatch.setattr(inputs, "MAX_COLLECT_BYTES", 1000)
    files = inputs.read_files(spark, normalize_uri(source), ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
    big, small = files["train-images-idx3-ubyte.gz"], files["t10k-labels-idx1-ubyte.gz"]
    assert big.source == str(source / "train-images-idx3-ubyte.gz")  # a path to stream from, not the bytes
    assert isinstance(small.source, bytes) and small.length == len(small.source)
