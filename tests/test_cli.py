"""The spark-mnist command: settings, exit codes and the one-line error for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from spark_mnist.cli import main
from spark_mnist.config import load_settings
from spark_mnist.errors import InputError
from tests.conftest import REPO


def test_local_yaml_loads_and_command_line_overrides(capsys):
    assert main(["config", "show", "--config", str(REPO / "conf" / "local.yaml"), "--epochs", "7",
                 "--num-shards", "3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["epochs"] == 7 and shown["ingest"]["num_shards"] == 3
    assert shown["ingest"]["source"] == "/usr/share/datasets/fashion-mnist"
    assert shown["spark"]["master"] == "local[2]"


def test_databricks_yaml_loads():
    settings = load_settings(REPO / "conf" / "databricks.yaml")
    assert settings.spark.master is None and settings.train.use_gpu
    assert settings.train.petastorm_cache_url.startswith("file:///Volumes/main/default/mnist/")  # no DBFS root


def test_unknown_key_and_wrong_type_name_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(InputError, match=r"bad.yaml: train.epochz: unknown key"):
        load_settings(bad)
    bad.write_text("train:\n  epochs: many\n")
    with pytest.raises(InputError, match=r"bad.yaml: train.epochs: .*integer"):
        load_settings(bad)


def test_bad_config_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest:\n  shards: 3\n")
    assert main(["config", "show", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.yaml" in err[0] and "ingest.shards: unknown key" in err[0]


def test_gc_removes_what_no_manifest_names_older_than_asked(tmp_path, capsys):
    """``spark-mnist gc OUT --older-than 0``: a killed ingest's generation goes now; one JSON line names it."""
    from spark_mnist.datasets import get_dataset
    from spark_mnist.shards.arrays import write_local_dataset
    from tests.stores.writer import arrays

    out = tmp_path / "out"
    for value in (1, 2, 3):
        write_local_dataset(out, get_dataset("mnist"), arrays(value))
    assert main(["gc", str(out)]) == 0 and json.loads(capsys.readouterr().out)["removed"] == []  # within a day
    assert main(["gc", str(out), "--older-than", "0"]) == 0
    removed = json.loads(capsys.readouterr().out.splitlines()[-1])["removed"]  # after the log line
    assert len(removed) == 1 and len(list(out.iterdir())) == 3


@pytest.mark.slow
@pytest.mark.connect
@pytest.mark.full
def test_ingest_bad_input_exits_2_one_stderr_line_and_writes_nothing(small_source, tmp_path, spark_remote_args):
    """The command in a child process of its own (a driver JVM of its own where classic: the full lane's): exit 2,
    one line on stderr naming the file, nothing written.  Every lane checks the same error in-process
    (test_ingest's bad input)."""
    source, _ = small_source
    (source / "t10k-images-idx3-ubyte.gz").write_bytes(b"<!DOCTYPE html><html>403 Forbidden</html>")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "spark_mnist.cli", "ingest", "--source", str(source),
                             "--output", str(out), *spark_remote_args], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "t10k-images-idx3-ubyte.gz" in lines[0] and "HTML" in lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


@pytest.mark.slow
def test_ingest_command_prints_json(spark, small_source, tmp_path, capsys):
    source, _ = small_source
    assert main(["ingest", "--source", str(source), "--output", str(tmp_path / "out"), "--num-shards", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rows"] == {"train": 600, "test": 100}


def test_databricks_jobs_default_to_databricks_yaml(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    from _entry import run

    assert run("config", ["show", "--epochs", "2"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["spark"]["master"] is None and shown["train"]["use_gpu"] and shown["train"]["epochs"] == 2


def test_verify_command_exit_codes(small_source, capsys):
    source, _ = small_source
    assert main(["verify", "--source", str(source), "--dataset", "fashion-mnist", "--allow-hash-mismatch"]) == 0
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().out
    assert main(["verify", "--source", str(source), "--dataset", "fashion-mnist"]) == 2  # not the published files
    (source / "t10k-labels-idx1-ubyte.gz").unlink()
    assert main(["verify", "--source", str(source), "--allow-hash-mismatch"]) == 2
