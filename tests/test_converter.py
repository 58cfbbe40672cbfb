"""The converter choice: petastorm where it works, the ingested shards directly elsewhere, one clear line when
petastorm is demanded where it cannot run."""

from __future__ import annotations

import pyarrow
import pyspark
import pytest

from spark_mnist.driver import session
from spark_mnist.cli import main
from spark_mnist.config import TrainSettings
from spark_mnist.driver.converter import choose_converter, petastorm_unavailable
from spark_mnist.errors import EnvironmentMismatchError

HERE = petastorm_unavailable()


def test_none_reads_the_shards_directly():
    choice = choose_converter(TrainSettings(converter="none"))
    assert choice.name == "none"


def test_auto_takes_petastorm_exactly_where_it_works():
    choice = choose_converter(TrainSettings(converter="auto"))
    if HERE is None:
        assert choice.name == "petastorm" and "pyarrow" in choice.reason
    else:
        assert choice.name == "none" and choice.reason == f"petastorm unavailable: {HERE}"


@pytest.mark.skipif(HERE is not None, reason=f"petastorm cannot run in this lane: {HERE}")
def test_petastorm_is_available_on_the_spark35_line():
    assert int(pyarrow.__version__.split(".")[0]) < 15 and pyspark.__version__.startswith("3.")
    assert choose_converter(TrainSettings(converter="petastorm")).name == "petastorm"


def test_pyarrow_15_or_newer_rules_petastorm_out(monkeypatch):
    monkeypatch.setattr(pyarrow, "__version__", "19.0.1")
    assert petastorm_unavailable() == "pyarrow 19.0.1 ≥ 15"
    choice = choose_converter(TrainSettings(converter="auto"))
    assert choice.name == "none" and choice.reason.startswith("petastorm unavailable: ")


def test_spark_4_rules_petastorm_out(monkeypatch):
    monkeypatch.setattr(pyarrow, "__version__", "14.0.1")
    monkeypatch.setattr(pyspark, "__version__", "4.0.0")
    assert petastorm_unavailable() == "Spark 4.0.0 ≥ 4"


@pytest.mark.parametrize("settings, named", [
    ({"converter": "petastorm"}, "train.converter 'petastorm'"),
    ({"loader": "petastorm"}, "train.loader 'petastorm'"),
])
def test_petastorm_demanded_where_it_cannot_run_names_versions_and_fix(monkeypatch, settings, named):
    monkeypatch.setattr(pyarrow, "__version__", "19.0.1")
    with pytest.raises(EnvironmentMismatchError) as raised:
        choose_converter(TrainSettings(**settings))
    message = str(raised.value)
    assert named in message and "converter 'none'" in message and "\n" not in message
    assert "pyarrow 19.0.1 ≥ 15" in message


def test_petastorm_loader_with_converter_none_is_refused():
    with pytest.raises(EnvironmentMismatchError, match=r"Invalid train.converter: 'none'. Must be 'auto' or 'petastorm' with train.loader 'petastorm'"):
        choose_converter(TrainSettings(loader="petastorm", converter="none"))


def test_cli_fails_before_spark_starts_with_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(pyarrow, "__version__", "19.0.1")

    def no_spark(*args, **kwargs):
        raise AssertionError("Spark was started")

    monkeypatch.setattr(session, "spark_session", no_spark)
    assert main(["train", "--data", str(tmp_path), "--converter", "petastorm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "petastorm" in err[0] and "converter 'none'" in err[0]
