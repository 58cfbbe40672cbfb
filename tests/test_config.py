"""The settings model: one definition per setting, the options made from it, the defaults, the run directory."""

from __future__ import annotations

import argparse

import pytest
import yaml

from spark_mnist.cli import build_parser, settings_from_args
from spark_mnist.config import SECTIONS, IngestSettings, Settings, TrainSettings, load_settings, options
from spark_mnist.errors import InputError
from tests.conftest import REPO

# The options `spark-mnist` had before they were made from the model: each keeps its name and meaning.
INGEST_FLAGS = {"--source", "--output", "--dataset", "--num-shards", "--strict", "--master", "--config", "--verbose"}
TRAIN_FLAGS = {"--data", "--run-dir", "--epochs", "--batch-size", "--num-processes", "--lr", "--seed", "--loader",
               "--converter", "--use-gpu", "--no-use-gpu", "--local-mode", "--no-local-mode", "--resume",
               "--checkpoint-every-steps", "--max-steps", "--master", "--config", "--verbose"}


def subcommand(command: str) -> argparse.ArgumentParser:
    actions = build_parser()._actions
    return next(a for a in actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def parse(*argv: str) -> Settings:
    args = build_parser().parse_args(list(argv))
    args.config = args.config or str(REPO / "conf" / "local.yaml")
    return settings_from_args(args)


def test_local_yaml_holds_the_models_defaults():
    """conf/local.yaml spells out the defaults; the model is their source, and the two agree key by key."""
    with open(REPO / "conf" / "local.yaml", encoding="utf-8") as f:
        assert yaml.safe_load(f) == Settings().dict()


@pytest.mark.parametrize("command, sections", [("ingest", ("spark", "storage", "ingest")),
                                               ("train", ("spark", "storage", "train")),
                                               ("run", SECTIONS), ("config", SECTIONS)])
def test_every_setting_of_a_section_is_an_option(command, sections):
    known = set(subcommand(command)._option_string_actions)
    for section in sections:
        model = Settings.__fields__[section].type_
        exposed = {name for name, field in model.__fields__.items() if field.field_info.extra.get("cli", True)}
        assert {o.name for o in options(section)} == exposed
        assert {"--" + name.replace("_", "-") for name in exposed} <= known, section
    assert (INGEST_FLAGS if command == "ingest" else TRAIN_FLAGS if command == "train" else
            INGEST_FLAGS | TRAIN_FLAGS) <= known
    if command == "ingest":
        assert "--epochs" not in known and "--data" not in known
    if command == "train":
        assert "--num-shards" not in known and "--source" not in known


def test_spark_settings_other_than_master_and_remote_have_no_option():
    assert [o.flag for o in options("spark")] == ["--master", "--remote"]
    with pytest.raises(ValueError, match=r"Invalid settings section: 'trian'. Must be one of 'spark', 'storage', "
                                         r"'ingest'"):
        list(options("trian"))


def test_every_option_sets_its_setting():
    """Each generated option, given a value other than the default, lands on its key; switches have both forms."""
    for section, model in (("ingest", IngestSettings), ("train", TrainSettings)):
        for option in options(section):
            default = getattr(model(), option.name)
            if option.type is bool:
                argv, expected = [option.flag if not default else "--no-" + option.flag[2:]], not default
            elif option.choices:
                expected = next((c for c in option.choices if c != default), default)  # model: one choice
                argv = [option.flag, expected]
            else:
                expected = {int: 3, float: 0.5, str: "/tmp/elsewhere"}[option.type]
                argv = [option.flag, str(expected)]
            settings = parse("config", "show", *argv)
            assert getattr(getattr(settings, section), option.name) == expected, (section, option.name)


def test_options_default_to_the_config_file(tmp_path):
    conf = tmp_path / "strict.yaml"
    conf.write_text("ingest:\n  strict: true\ntrain:\n  local_mode: false\n  epochs: 9\n")
    settings = parse("config", "show", "--config", str(conf))
    assert settings.ingest.strict and not settings.train.local_mode and settings.train.epochs == 9
    settings = parse("config", "show", "--config", str(conf), "--no-strict", "--local-mode", "--epochs", "2")
    assert not settings.ingest.strict and settings.train.local_mode and settings.train.epochs == 2
    args = build_parser().parse_args(["train", "--resume"])
    assert args.resume is True and args.use_gpu is None and args.epochs is None and not hasattr(args, "strict")
    assert build_parser().parse_args(["ingest"]).strict is None


def test_bad_option_values_are_refused_naming_the_key():
    with pytest.raises(InputError, match=r"command line: epochs: .*greater than or equal to 1 \(got 0\)"):
        parse("config", "show", "--epochs", "0")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--loader", "torchvision"])


def test_run_dir_defaults_to_runs_beside_the_dataset():
    """A second dataset trained without --run-dir does not overwrite the first one's model."""
    assert load_settings(None).train.run_dir == "out/runs/fashion-mnist"
    assert parse("config", "show").train.run_dir == "out/runs/fashion-mnist"
    assert parse("train", "--data", "out/mnist").train.run_dir == "out/runs/mnist"
    assert parse("train", "--data", "out/kmnist/").train.run_dir == "out/runs/kmnist"
    assert parse("run", "--output", "/data/emnist-letters").train.run_dir == "/data/runs/emnist-letters"
    assert parse("train", "--data", "dbfs:/mnist/parquet").train.run_dir == "dbfs:/mnist/runs/parquet"
    assert parse("train", "--data", "out/mnist", "--run-dir", "here").train.run_dir == "here"
    # the ranks write locally: a dataset on an object store trains into runs/NAME in the working directory
    assert parse("train", "--data", "s3://K:S@b/x/mnist?endpoint_override=h:1").train.run_dir == "runs/mnist"
    assert parse("train", "--data", "abfss://c@a.dfs.core.windows.net/fmnist/").train.run_dir == "runs/fmnist"
    settings = Settings(train=TrainSettings(data="/x/y"))
    assert settings.train.run_dir is None and settings.run_dir == "/x/runs/y"
    with pytest.raises(InputError, match=r"Invalid train.data: '/'. Must be a directory with a name"):
        parse("train", "--data", "/")


def test_databricks_yaml_keeps_its_run_dir_in_the_volume():
    settings = load_settings(REPO / "conf" / "databricks.yaml")
    assert settings.train.run_dir == "/Volumes/main/default/mnist/runs/fashion-mnist"


def test_storage_settings_are_the_stores_standard_variables(monkeypatch):
    """storage.s3_endpoint_url is AWS_ENDPOINT_URL for what spark-mnist runs: the pipeline's block, the executors
    of the sessions it starts (spark.executorEnv), and the URI Spark's write tasks are given."""
    from spark_mnist import fs
    from spark_mnist.driver.session import with_executor_env
    from spark_mnist.envs import scoped_env
    from spark_mnist.paths import normalize_uri

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    settings = load_settings(None, {"storage": {"s3_endpoint_url": "http://127.0.0.1:9000"}})
    assert settings.storage.environment() == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}
    assert Settings().storage.environment() == {}
    spark = with_executor_env(settings.spark, settings.storage.environment())
    assert spark.conf["spark.executorEnv.AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert with_executor_env(settings.spark, {}) == settings.spark
    out = normalize_uri("s3://bucket/mnist")
    assert fs.task_uri(out) == "s3://bucket/mnist"
    with scoped_env(settings.storage.environment()):
        assert fs.task_uri(out) == "s3://bucket/mnist?endpoint_override=127.0.0.1%3A9000&scheme=http"
        given = "s3://bucket/x?endpoint_override=h:1"
        assert fs.task_uri(normalize_uri(given)) == given
    assert fs.task_uri(normalize_uri("/tmp/x")) == "/tmp/x"
    assert parse("ingest", "--s3-endpoint-url", "http://minio:9000").storage.s3_endpoint_url == "http://minio:9000"
