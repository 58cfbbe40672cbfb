"""Which files the ranks read: petastorm's Spark dataset converter where petastorm works, the ingested shards
directly everywhere else.  Driver-side.  See docs/concepts/training.md.

petastorm works only with pyarrow < 15 and a classic session: the Spark 3.5 line (Databricks Runtime 15.4 LTS ML);
why: docs/development.md.  The setting ``train.converter`` picks the path:

* ``auto``: petastorm where :func:`petastorm_unavailable` finds nothing against it, else the shards directly;
* ``petastorm``: petastorm, or an :class:`~spark_mnist.errors.EnvironmentMismatchError` naming the versions;
* ``none``: the shards directly: no second copy of the data; the same loader, exact sharding, resume and figures.

Over Spark Connect (``--remote``, Databricks Connect, serverless) petastorm's converter cannot run at all, and
``auto`` takes ``none``.

petastorm is an optional extra (``pip install 'spark-mnist[petastorm]'``) and is only imported here, inside
functions.
"""

from importlib import import_module, metadata
from typing import Any, NamedTuple, Optional

import pyarrow

from spark_mnist.config import TrainSettings
from spark_mnist.datasets import SPLITS
from spark_mnist.errors import EnvironmentMismatchError, invalid
from spark_mnist.shards.contract import Dataset

__all__ = ["PETASTORM_FIX", "ConverterChoice", "petastorm_unavailable", "choose_converter", "make_converters"]

PETASTORM_FIX = (
    "use converter 'none' (the ranks read the ingested shards), or petastorm on Spark 3.5 with "
    "pyarrow < 15 (Databricks Runtime 15.4 LTS ML; pip install 'spark-mnist[petastorm]')"
)


# The path training takes: ``name`` is ``"petastorm"`` or ``"none"``; ``reason`` says why, in one line.
ConverterChoice = NamedTuple("ConverterChoice", [("name", str), ("reason", str)])


def petastorm_unavailable(connect: bool = False) -> Optional[str]:
    """Why petastorm's converter cannot run in this environment, or ``None`` where it can.

    Checks, in order: a Spark Connect session (``connect``: the converter reads the classic session's JVM, its
    ``_jdf`` and ``sparkContext``), pyarrow < 15, pyspark < 4 (their ``__version__``), petastorm installed (its
    distribution's version), then that ``petastorm.spark`` imports: petastorm is imported only where the cheap checks
    pass.

    Returns:
        One line such as ``"pyarrow 19.0.1 ≥ 15"``, or ``None``.
    """
    import pyspark  # the CLI imports this module for its Spark-free commands too (verify, preview, download)

    if connect:
        return "a Spark Connect session (petastorm's converter needs the classic session's JVM)"
    # petastorm's converter needs pyarrow < 15 (pyarrow.filesystem, legacy ParquetDataset) and Spark < 4.
    for name, version, first_refused in (("pyarrow", pyarrow.__version__, 15), ("Spark", pyspark.__version__, 4)):
        if int(version.split(".", 1)[0]) >= first_refused:
            return f"{name} {version} ≥ {first_refused}"
    try:
        petastorm = metadata.version("petastorm")
        import_module("petastorm.spark")
    except metadata.PackageNotFoundError:
        return "petastorm is not installed"
    except Exception as e:  # noqa: BLE001 - any import failure means petastorm cannot run here
        return f"petastorm {petastorm} does not import: {type(e).__name__}: {e}"
    return None


def choose_converter(settings: TrainSettings, *, connect: bool = False) -> ConverterChoice:
    """The converter of ``settings.converter`` (``auto``, ``petastorm`` or ``none``) in this environment, for a
    classic session or (``connect``) a Spark Connect one.

    ``settings.loader == "petastorm"`` needs petastorm's converter (it reads through ``make_torch_dataloader``).
    Cheap and Spark-free, so the CLI calls it before starting Spark.

    Raises:
        EnvironmentMismatchError: petastorm asked for (``converter: petastorm`` or ``loader: petastorm``) where it
            cannot run, or ``loader: petastorm`` with ``converter: none``; one line naming the versions and the fix.
    """
    if settings.loader == "petastorm" and settings.converter == "none":
        must = "'auto' or 'petastorm' with train.loader 'petastorm' (the petastorm loader reads through petastorm's "
        must += "converter), or set train.loader to 'spark-mnist'"
        raise invalid("train.converter", "none", must, EnvironmentMismatchError)
    if settings.converter == "none":
        return ConverterChoice("none", "converter 'none' set")
    why_not = petastorm_unavailable(connect)
    if why_not is None:
        import pyspark  # as in petastorm_unavailable: the CLI's Spark-free commands import this module

        versions = f"pyarrow {pyarrow.__version__} and Spark {pyspark.__version__}"
        return ConverterChoice("petastorm", f"petastorm {metadata.version('petastorm')} with {versions}")
    if settings.loader == "petastorm" or settings.converter == "petastorm":
        what = "train.loader 'petastorm'" if settings.loader == "petastorm" else "train.converter 'petastorm'"
        raise EnvironmentMismatchError(f"{what} needs petastorm, which cannot run here ({why_not}): {PETASTORM_FIX}")
    return ConverterChoice("none", f"petastorm unavailable: {why_not}")


def make_converters(spark, dataset: Dataset, cache_url: str, row_group_bytes: int) -> dict[str, Any]:
    """petastorm Spark dataset converters of an ingested dataset's splits: ``{"train": ..., "test": ...}``, read
    from exactly the files its manifest names (``spark.read.parquet(*dataset.files(split))``,
    :func:`spark_mnist.shards.contract.open_dataset`).

    Driver-side; each materialises its split under ``cache_url`` (``file:///Volumes/...`` on Databricks),
    uncompressed (docs/benchmarks.md).  Call ``.delete()`` when done.  Only where :func:`petastorm_unavailable` is
    ``None``.
    """
    from petastorm.spark import SparkDatasetConverter, make_spark_converter  # optional: where it can run only

    spark.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, cache_url)
    options = {"parquet_row_group_size_bytes": row_group_bytes, "compression_codec": "uncompressed"}
    return {split: make_spark_converter(spark.read.parquet(*dataset.files(split)), **options) for split in SPLITS}
