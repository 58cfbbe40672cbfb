"""Typed settings from ``conf/*.yaml`` with command-line overrides; read on the driver, handed to the ranks in the job.

A YAML file has four sections, ``spark``, ``storage``, ``ingest`` and ``train`` (see ``conf/local.yaml``).
Unknown keys and values of the wrong type are errors naming the key and the file.  Defaults are the local-mode
ones, and the models below are their one source (``conf/local.yaml`` repeats them for reading; a test keeps the two
equal).

Each setting is defined once, as a field with a description; the ``spark-mnist`` options that override it are made
from the field (:func:`options`): ``--kebab-case`` of its name, its type, a ``Literal``'s values as choices, its
description as help.  A field declared with ``cli=False`` has no option.

The models are written against pydantic's v1 API (``pydantic`` in 1.10, ``pydantic.v1`` in 2), one code path for both
majors; why: docs/development.md (the package table).
"""

import os
import pathlib
import posixpath
from typing import Any, Iterator, Literal, NamedTuple, Optional, get_args, get_origin

import yaml

try:  # pydantic 2 keeps the v1 API under pydantic.v1; pydantic 1.10 is that API
    from pydantic.v1 import BaseModel, Extra, Field, ValidationError
except ImportError:  # pragma: no cover - exercised in the spark35 lane (pydantic 1.10)
    from pydantic import BaseModel, Extra, Field, ValidationError  # type: ignore[assignment]  # the same API

from spark_mnist.errors import InputError, check_choice, invalid
from spark_mnist.paths import normalize_uri

__all__ = ["SECTIONS", "SparkSettings", "StorageSettings", "IngestSettings", "ACCELERATOR_TYPES", "MODELS",
           "TrainSettings", "Settings", "Option", "options", "DATABRICKS_DEFAULTS", "load_settings",
           "Values"]  # fmt: skip

SECTIONS = ("spark", "storage", "ingest", "train")


class _Section(BaseModel, extra=Extra.forbid, validate_assignment=True):
    """A section of the settings: an unknown key is an error, and so is a bad value assigned (an override)."""


class SparkSettings(_Section):
    """How the driver gets its SparkSession (:func:`spark_mnist.driver.session.spark_session`).  ``master: null``
    uses the cluster's (Databricks), or Databricks Connect's where ``databricks-connect`` is installed; ``remote``
    (or the ``SPARK_REMOTE`` environment variable) a Spark Connect server."""

    master: Optional[str] = Field("local[2]", description="Spark master, e.g. local[2]; null: the cluster's session")
    remote: Optional[str] = Field(
        None,
        description="Spark Connect server, sc://host:port (local[N]: start one here); "
        "default: the SPARK_REMOTE environment variable",
    )
    app_name: str = Field(default="spark-mnist", description="Spark application name", cli=False)
    log_level: str = Field(default="WARN", description="Spark's log level (--verbose: INFO)", cli=False)
    conf: dict[str, str] = Field({}, description="extra Spark conf for sessions spark-mnist starts", cli=False)


class StorageSettings(_Section):
    """Where the object stores of ``s3://`` sources, outputs and datasets are, as settings: each is the standard
    variable of its store's client (named in its description), set for what spark-mnist runs (the driver, the ranks
    it launches, the executors of sessions it starts through ``spark.executorEnv``) and written into the URI Spark's
    write tasks are given.  Null: the environment's variable, else the client's default.  Credentials are not
    settings: they come from the store's own chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``,
    an instance profile; Azure's ``AZURE_STORAGE_CONNECTION_STRING`` or ``AZURE_STORAGE_ACCOUNT_KEY``)."""

    s3_endpoint_url: Optional[str] = Field(
        None, description="S3-compatible store (MinIO, Ceph, moto), http(s)://host:port: AWS_ENDPOINT_URL"
    )

    def environment(self) -> dict[str, str]:
        """The standard variables these settings give: ``{"AWS_ENDPOINT_URL": ...}`` for each setting not null."""
        return {"AWS_ENDPOINT_URL": self.s3_endpoint_url} if self.s3_endpoint_url is not None else {}


class IngestSettings(_Section):
    """gz IDX files -> Parquet shards.  ``num_shards: null`` is one shard per Spark core."""

    dataset: str = Field("fashion-mnist", description="registry name: mnist, fashion-mnist, kmnist, emnist-<split>")
    source: str = Field(
        "/usr/share/datasets/fashion-mnist", description="directory or URI holding the four gz IDX files"
    )
    output: str = Field(
        "out/fashion-mnist", description="dataset directory to (re)create: OUT/train, OUT/test, OUT/_manifest.json"
    )
    num_shards: Optional[int] = Field(None, ge=1, description="Parquet files per split (default: one per Spark core)")
    row_group_bytes: int = Field(2**20, ge=1, description="target bytes of images per Parquet row group")
    strict: bool = Field(False, description="refuse files whose payload sha256 differs from the registry's")


# The accelerator types of databricks.air (AcceleratorType) and of a bundle's ai_runtime_task (databricks-bundles'
# ComputeSpecAcceleratorType); tests/test_launch.py and tests/test_bundle.py keep the three lists equal.
AcceleratorType = Literal["GPU_1xA10", "GPU_1xH100", "GPU_8xH100", "GPU_8xB300"]
ACCELERATOR_TYPES = get_args(AcceleratorType)
Model = Literal["simple-cnn"]  # spark_mnist.models.build_model builds each
MODELS = get_args(Model)


class TrainSettings(_Section):
    """Distributed training: ``launcher`` starts ``num_processes`` ranks (:mod:`spark_mnist.launch`).  ``data``
    defaults to ``ingest.output``; ``run_dir`` to ``runs/<dataset directory's name>`` beside the dataset directory,
    or in the working directory for a dataset on an object store (:attr:`Settings.run_dir`)."""

    data: Optional[str] = Field(None, description="ingested dataset directory (default: ingest.output)")
    run_dir: Optional[str] = Field(
        None,
        description="where model.pt, checkpoint.pt and metrics.json go (default: runs/NAME beside the dataset "
        "directory NAME; ./runs/NAME for a dataset on an object store)",
    )
    epochs: int = Field(5, ge=1, description="passes over the training split")
    batch_size: int = Field(128, ge=1, description="samples per step per rank")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    seed: int = Field(0, description="seed of the model's initialisation and of the shuffle")
    launcher: Literal["torch-distributor", "torchrun", "ai-runtime"] = Field(
        "torch-distributor",
        description="what starts the ranks: torch-distributor (pyspark's TorchDistributor, on a Spark session), "
        "torchrun (local processes, no Spark), ai-runtime (databricks.air's @distributed, serverless GPU)",
    )
    num_processes: int = Field(2, ge=1, description="ranks (TorchDistributor num_processes, torchrun nproc_per_node)")
    local_mode: bool = Field(True, description="run ranks on the driver (local) or in executors")
    use_gpu: bool = Field(False, description="one GPU per rank, nccl")
    bf16: bool = Field(False, description="bfloat16 autocast in the training step")
    resident_data: Literal["auto", "on", "off"] = Field(
        "auto",
        description="keep each rank's decoded split on its training device and gather batches there: auto: "
        "with use_gpu, when it fits a quarter of the GPU's free memory; on: on the CPU too "
        "(within memory_budget_mb); off: batches made on the host and copied",
    )
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto", description="channels_last memory format for the model and its input (auto: with use_gpu)"
    )
    compile: bool = Field(
        False,
        description="torch.compile the training step (falls back, with a warning naming "
        "the error, where compiling or the first compiled step fails)",
    )
    petastorm_cache_url: str = Field(
        "file:///tmp/spark-mnist-petastorm", description="where petastorm's converter caches the dataset"
    )
    petastorm_row_group_bytes: int = Field(2**20, ge=1, description="row-group size of petastorm's cache")
    loader: Literal["spark-mnist", "petastorm"] = Field("spark-mnist", description="what reads the shards in a rank")
    converter: Literal["auto", "petastorm", "none"] = Field(
        "auto",
        description="petastorm's Spark dataset converter, or the ingested shards directly (none); "
        "auto: petastorm where it works (Spark 3.5, pyarrow < 15)",
    )
    model: Model = Field("simple-cnn", description="the model: simple-cnn (spark_mnist.models.SimpleCNN)")
    memory_budget_mb: int = Field(2048, ge=0, description="decoded images a rank's loader may hold, in MiB")
    reader_threads: int = Field(2, ge=1, description="Parquet reader threads per rank")
    threads_per_rank: int = Field(0, ge=0, description="torch threads per rank; 0: cores / ranks on the node")
    checkpoint_every_steps: int = Field(0, ge=0, description="also checkpoint every K steps")
    max_steps: int = Field(0, ge=0, description="stop this run after N steps (checkpointed; --resume goes on)")
    resume: bool = Field(False, description="continue from run_dir's checkpoint")
    auto_resume: bool = Field(
        False,
        description="continue from run_dir's checkpoint when it is of this dataset and "
        "these settings, else start afresh (a retried job goes on)",
    )
    max_restarts: int = Field(
        1,
        ge=0,
        description="relaunch from the last checkpoint when a rank dies or raises, at most N times; 1: a lost "
        "worker (preemption, OOM kill) costs one relaunch, and an error that recurs fails after one retry rather "
        "than looping (a job's max_retries adds more, with auto_resume)",
    )
    accelerator_count: Optional[int] = Field(
        None, ge=1, description="ai-runtime: GPUs, databricks.air's num_accelerators (default: num_processes)"
    )
    accelerator_type: Optional[AcceleratorType] = Field(
        None,
        description="ai-runtime: databricks.air's accelerator_type (default: the GPUs attached here; "
        "required with remote_gpu)",
    )
    remote_gpu: bool = Field(
        False,
        description="ai-runtime: submit to serverless GPUs (databricks.air remote=True) "
        "from a CPU notebook or job; false: the GPUs attached here",
    )


class Settings(_Section):
    """All settings of one run."""

    spark: SparkSettings = Field(default_factory=SparkSettings)  # type: ignore[arg-type]  # Field(x, ...)
    storage: StorageSettings = Field(default_factory=StorageSettings)  # type: ignore[arg-type]  # Field(x, ...)
    ingest: IngestSettings = Field(default_factory=IngestSettings)  # type: ignore[arg-type]  # Field(x, ...)
    train: TrainSettings = Field(default_factory=TrainSettings)  # type: ignore[arg-type]  # Field(x, ...)

    @property
    def data_dir(self) -> str:
        """Where training reads the ingested dataset: ``train.data``, else ``ingest.output``."""
        return self.train.data or self.ingest.output

    @property
    def run_dir(self) -> str:
        """Where training writes: ``train.run_dir``, else ``runs/NAME`` beside the dataset directory ``NAME``
        (``out/fashion-mnist`` -> ``out/runs/fashion-mnist``, ``dbfs:/x`` -> ``dbfs:/runs/x``), so that training on
        another dataset keeps this one's model.  A dataset on an object store (``s3://b/x?endpoint_override=...``),
        where the ranks cannot write their files, gives the local ``runs/NAME`` in the working directory.

        Raises:
            InputError: ``train.run_dir`` is null and the dataset directory has no name (``/``, ``file:///``).
        """
        if self.train.run_dir:
            return self.train.run_dir
        location, trimmed = normalize_uri(self.data_dir), self.data_dir.rstrip("/")
        # remote: runs/NAME in the working directory
        parent, name = ("", location.name) if location.kind == "remote" else posixpath.split(trimmed)
        if not name or name.endswith(":"):
            raise invalid("train.data", self.data_dir, "a directory with a name when train.run_dir is null", InputError)
        return posixpath.join(parent, "runs", name)


# One setting as a command-line option: its field's name, its spelling (--num-shards for num_shards), the value's
# type (bool for a switch), the allowed values of a Literal and the field's description as help.
Option = NamedTuple(
    "Option", [("name", str), ("flag", str), ("type", type), ("choices", tuple | None), ("help", str | None)]
)


def options(section: str) -> Iterator[Option]:
    """The command-line options of one section (``spark``, ``storage``, ``ingest``, ``train``): every field not
    declared with ``cli=False``, in the order of the model, so a new field is an option without more code.

    Raises (when iterated):
        ValueError: ``section`` is not a section; TypeError: a field of a type an option cannot carry (a mapping)
            lacks ``cli=False``.
    """
    check_choice("settings section", section, SECTIONS)
    for name, field in Settings.__fields__[section].type_.__fields__.items():
        if not field.field_info.extra.get("cli", True):
            continue
        choices = get_args(field.outer_type_) if get_origin(field.outer_type_) is Literal else None
        tp = type(choices[0]) if choices else field.outer_type_  # a constrained int (ge=1) is an int subclass
        base = next((t for t in (bool, int, float, str) if isinstance(tp, type) and issubclass(tp, t)), None)
        if base is None:
            raise TypeError(f"{section}.{name}: a {tp} cannot be a command-line option; declare it with cli=False")
        yield Option(name, "--" + name.replace("_", "-"), base, choices, field.field_info.description)


def _error(source: str, error: ValidationError, data: Any) -> InputError:
    lines = []
    for item in error.errors():
        key, value = ".".join(str(p) for p in item["loc"]), data
        for part in item["loc"]:  # pydantic's v1 errors carry the location, not the value
            value = value.get(part) if isinstance(value, dict) else None
        unknown = item["type"] == "value_error.extra"
        lines.append(f"{key}: unknown key" if unknown else f"{key}: {item['msg']} (got {value!r})")
    return InputError(f"{source}: " + "; ".join(lines))


Values = dict[str, dict[str, Any]]  # {section: {key: value}}

# What the notebook API starts from on Databricks when no config file is given (spark_mnist.ingest, .train): the
# cluster's session, the ranks on the workers' GPUs, and the ranks reading the ingested shards directly (petastorm's
# cache would need a path every worker shares; conf/databricks.yaml names one).
DATABRICKS_DEFAULTS: Values = {
    "spark": {"master": None},
    "train": {"use_gpu": True, "local_mode": False, "converter": "none"},
}


def load_settings(
    path: str | os.PathLike | None = None, overrides: Values | None = None, *, defaults: Values | None = None
) -> Settings:
    """Settings from the YAML file ``path`` (where ``None``: the model's defaults, with ``defaults`` on top, e.g.
    :data:`DATABRICKS_DEFAULTS`), then ``overrides`` (``{section: {key: value}}``, ``None`` values ignored) on top; a
    null ``train.run_dir`` becomes :attr:`Settings.run_dir`, so the settings shown and logged say where the run goes.

    Raises:
        InputError: a missing or unreadable file, an unknown key, a value of the wrong type; the message names
            the file (or "command line") and the key (an unknown key of ``overrides``: ``Invalid train setting:
            'epoch'. Must be one of ...``).  A null ``train.run_dir`` with a dataset directory that has no name
            (``/``).
    """
    data: dict[str, Any] = {section: dict(values) for section, values in (defaults or {}).items()}
    source = "defaults" if path is None else os.fspath(path)
    if path is not None:
        try:
            data = yaml.safe_load(pathlib.Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError as e:
            raise InputError(f"{source}: config file not found") from e
        except yaml.YAMLError as e:
            raise InputError(f"{source}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)})")
    try:
        settings = Settings.parse_obj(data)
    except ValidationError as e:
        raise _error(source, e, data) from None
    for section, values in (overrides or {}).items():
        for key, value in values.items():
            check_choice(f"{section} setting", key, Settings.__fields__[section].type_.__fields__, InputError)
            try:
                if value is not None:
                    setattr(getattr(settings, section), key, value)
            except ValidationError as e:
                raise _error("command line", e, {key: value}) from None
    settings.train.run_dir = settings.run_dir
    return settings
