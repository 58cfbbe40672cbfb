"""Typed settings from ``conf/*.yaml`` with command-line overrides.

A YAML file has three sections, ``spark``, ``ingest`` and ``train`` (see ``conf/local.yaml``).  Unknown keys and
values of the wrong type are errors naming the key and the file.  Defaults are the local-mode ones.

The models are written against pydantic's v1 API, which pydantic 1.10 (Databricks Runtime 15.4 ML ships 1.10.6)
provides as ``pydantic`` and pydantic 2 as ``pydantic.v1``: one code path for both majors, so installing this
package never replaces the runtime's pydantic.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Optional

import yaml
try:  # pydantic 2 keeps the v1 API under pydantic.v1; pydantic 1.10 is that API
    from pydantic.v1 import BaseModel, Extra, Field, ValidationError
except ImportError:  # pragma: no cover - exercised in the spark35 lane (pydantic 1.10)
    from pydantic import BaseModel, Extra, Field, ValidationError  # type: ignore[no-redef]

from spark_mnist.errors import InputError


class _Section(BaseModel):
    class Config:
        extra = Extra.forbid
        validate_assignment = True


class SparkSettings(_Section):
    """How the driver gets its SparkSession.  ``master: null`` uses the cluster's (Databricks)."""

    master: Optional[str] = "local[2]"
    app_name: str = "spark-mnist"
    log_level: str = "WARN"
    conf: dict[str, str] = Field(default_factory=dict)


class IngestSettings(_Section):
    """gz IDX files -> Parquet shards.  ``num_shards: null`` is one shard per Spark core."""

    dataset: str = "fashion-mnist"
    source: str = "/usr/share/datasets/fashion-mnist"
    output: str = "out/fashion-mnist"
    num_shards: Optional[int] = Field(None, ge=1)
    row_group_bytes: int = Field(2**20, ge=1)
    strict: bool = False


class TrainSettings(_Section):
    """Distributed training with TorchDistributor.  ``data`` defaults to ``ingest.output``."""

    data: Optional[str] = None
    run_dir: str = "out/run"
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0
    num_processes: int = Field(2, ge=1)
    local_mode: bool = True
    use_gpu: bool = False
    bf16: bool = False
    petastorm_cache_url: str = "file:///tmp/spark-mnist-petastorm"
    petastorm_row_group_bytes: int = Field(2**20, ge=1)
    loader: Literal["spark-mnist", "petastorm"] = "spark-mnist"
    converter: Literal["auto", "petastorm", "none"] = "auto"
    model: str = "simple-cnn"
    memory_budget_mb: int = Field(2048, ge=0)
    reader_threads: int = Field(2, ge=1)
    threads_per_rank: int = Field(0, ge=0)
    checkpoint_every_steps: int = Field(0, ge=0)
    max_steps: int = Field(0, ge=0)
    resume: bool = False


class Settings(_Section):
    """All settings of one run."""

    spark: SparkSettings = Field(default_factory=SparkSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)

    def to_dict(self) -> dict[str, Any]:
        """Every setting as plain values: ``{"spark": {...}, "ingest": {...}, "train": {...}}``."""
        return self.dict()

    @property
    def data_dir(self) -> str:
        """Where training reads the ingested dataset."""
        return self.train.data or self.ingest.output


def _value_at(data: Any, loc: tuple) -> Any:
    """The value at ``loc`` in ``data`` (pydantic's v1 errors carry the location, not the value)."""
    for part in loc:
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _error(source: str, error: ValidationError, data: dict[str, Any]) -> InputError:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        if item["type"] == "value_error.extra":
            lines.append(f"{key}: unknown key")
        else:
            lines.append(f"{key}: {item['msg']} (got {_value_at(data, item['loc'])!r})")
    return InputError(f"{source}: " + "; ".join(lines))


def load_settings(path: str | os.PathLike | None = None, overrides: dict[str, dict[str, Any]] | None = None
                  ) -> Settings:
    """Settings from the YAML file ``path`` (defaults where ``None``), then ``overrides`` (``{section: {key:
    value}}``, ``None`` values ignored) on top.

    Raises:
        InputError: a missing or unreadable file, an unknown key, a value of the wrong type; the message names
            the file (or "command line") and the key.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError as e:
            raise InputError(f"{source}: config file not found") from e
        except yaml.YAMLError as e:
            raise InputError(f"{source}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected a mapping of sections (spark, ingest, train)")
    try:
        settings = Settings.parse_obj(data)
    except ValidationError as e:
        raise _error(source, e, data) from None
    for section, values in (overrides or {}).items():
        for key, value in values.items():
            if value is None:
                continue
            try:
                setattr(getattr(settings, section), key, value)
            except ValidationError as e:
                raise _error("command line", e, {key: value}) from None
    return settings


def show(settings: Settings) -> str:
    """The effective settings as YAML."""
    return yaml.safe_dump(settings.to_dict(), sort_keys=False)
