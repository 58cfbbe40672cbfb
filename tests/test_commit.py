"""The commit's retention on local disk (:mod:`spark_mnist.shards.commit`): generations no manifest names go by age,
an ingest older than the retention publishes nothing, and the previous release's datasets and ingests are read and
left alone.  The same on every store, with writer processes: tests/test_stores.py."""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime, timedelta, timezone

import pytest

import spark_mnist
from spark_mnist import fs
from spark_mnist.datasets import get_dataset
from spark_mnist.paths import normalize_uri
from spark_mnist.shards import commit
from spark_mnist.shards.arrays import write_local_dataset
from spark_mnist.shards.contract import MANIFEST_NAME
from tests.stores.writer import arrays

# The previous release's generation names, the only ones its clean-up deletes (its commit.GENERATION_PATTERN).
PREVIOUS_RELEASE_PATTERN = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{12}$")
MNIST = get_dataset("mnist")


def leftover(out, age_s: float, sep: str = "_", lease: bool = False) -> str:
    """A generation no manifest names, started ``age_s`` ago (``sep="-"``: the previous release's name; ``lease``:
    with that release's lease, as its ingest writes it)."""
    start = datetime.now(timezone.utc) - timedelta(seconds=age_s)
    name = f"{start.strftime(commit.GENERATION_TIME)}{sep}0123456789ab"
    os.makedirs(out.join(name, "train").os_path)
    fs.write_whole(out.join(name, "train", "part-00000.parquet"), b"shard")
    if lease:
        os.makedirs(out.join(name, "_lease").os_path)
        fs.write_whole(out.join(name, "_lease", "lease.json"), json.dumps({"generation": name, "beat": 1}).encode())
    return name


def names(out) -> set[str]:
    return set(fs.list_names(out))


def test_a_generation_name_carries_its_start_and_sorts_after_the_current():
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).strftime(commit.GENERATION_TIME) + "-0123456789ab"
    name = commit.new_generation(after=later)
    assert commit.generation_start(name) == commit.generation_start(later) + timedelta(microseconds=1)
    assert abs(commit._age_s(commit.new_generation())) < 60 and commit.generation_start("_manifest.json") is None


def test_clean_removes_by_age_only_what_no_manifest_names(tmp_path):
    out = normalize_uri(tmp_path / "out")
    first = write_local_dataset(out.local_path, MNIST, arrays(1))
    old, young = leftover(out, 2 * commit.RETENTION_S), leftover(out, 60)
    (tmp_path / "out" / f".{MANIFEST_NAME}.tmp-1").write_text("{")
    second = write_local_dataset(out.local_path, MNIST, arrays(2))
    third = write_local_dataset(out.local_path, MNIST, arrays(3))
    assert names(out) == {first.generation, second.generation, third.generation, young, MANIFEST_NAME,
                          f".{MANIFEST_NAME}.tmp-1"}  # fmt: skip
    assert commit.clean(out, older_than=0) == sorted([first.generation, young])  # spark-mnist gc OUT --older-than 0
    assert names(out) == {second.generation, third.generation, MANIFEST_NAME}
    assert spark_mnist.open_dataset(out.local_path).manifest.previous == second.generation


def test_an_ingest_older_than_the_retention_publishes_nothing(tmp_path, monkeypatch):
    out = normalize_uri(tmp_path / "out")
    first = write_local_dataset(out.local_path, MNIST, arrays(1))
    monkeypatch.setattr(commit, "RETENTION_S", 0.0)
    with pytest.raises(OSError, match=r"out: generation \S+ started 0 s ago, more than the retention.*nothing was"):
        write_local_dataset(out.local_path, MNIST, arrays(2))
    assert spark_mnist.open_dataset(out.local_path).manifest.generation == first.generation
    assert names(out) == {first.generation, MANIFEST_NAME}  # discarded


def test_a_failed_write_discards_the_generation(tmp_path):
    out = normalize_uri(tmp_path / "out")
    with pytest.raises(RuntimeError, match="bad input found late"):
        with commit.writing(out):
            raise RuntimeError("bad input found late")
    assert not fs.exists(out)  # OUT was created by this ingest: gone too


def test_a_dataset_of_the_previous_release_is_read_and_replaced(tmp_path):
    """The previous release's manifest (same schema, a ``<time>-<hex>`` generation) is read; the next ingest keeps
    it as its ``previous``."""
    out = normalize_uri(tmp_path / "out")
    ours = write_local_dataset(out.local_path, MNIST, arrays(1)).generation
    theirs = ours.replace("_", "-")
    shutil.move(tmp_path / "out" / ours, tmp_path / "out" / theirs)
    manifest = tmp_path / "out" / MANIFEST_NAME
    manifest.write_text(manifest.read_text().replace(ours, theirs))
    assert spark_mnist.load_data(out.local_path, "mnist")[0][0].max() == 1
    new = write_local_dataset(out.local_path, MNIST, arrays(2))
    assert new.previous == theirs and names(out) == {theirs, new.generation, MANIFEST_NAME}


def test_two_releases_never_delete_each_others_live_generation(tmp_path):
    """This release's generations are no names the previous release's clean-up deletes; this release deletes the
    previous release's (a live ingest's lease) only past the retention."""
    out = normalize_uri(tmp_path / "out")
    write_local_dataset(out.local_path, MNIST, arrays(1))
    live, dead = leftover(out, 60, "-", lease=True), leftover(out, 2 * commit.RETENTION_S, "-", lease=True)
    with commit.writing(out) as ingest:
        assert not PREVIOUS_RELEASE_PATTERN.match(ingest.generation) and PREVIOUS_RELEASE_PATTERN.match(live)
        write_local_dataset(out.local_path, MNIST, arrays(2))
        assert live in names(out) and dead not in names(out)
