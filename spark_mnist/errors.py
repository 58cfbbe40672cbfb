"""The errors spark-mnist raises for bad input.

Every one of them is a ``ValueError`` subclass whose message names the file (or setting) at fault and says what was
expected and what was found.  The CLI turns any :class:`InputError` into one line on stderr and exit code 2.
"""

import importlib
from typing import Any, Collection

__all__ = ["InputError", "IdxFormatError", "DatasetMismatchError", "SourceError", "ChecksumMismatchError",
           "DatasetNotFoundError", "EnvironmentMismatchError", "LauncherUnavailableError", "CheckpointError",
           "LoaderStateError", "invalid", "check_choice", "require_extra"]  # fmt: skip


class InputError(ValueError):
    """Bad input: a file, a path or a setting that cannot be used as given."""


class IdxFormatError(InputError):
    """A file that is not a well-formed IDX file (gzip-compressed or plain)."""


class DatasetMismatchError(InputError):
    """Well-formed IDX files that do not form the declared dataset (shape, label range, counts)."""


class SourceError(InputError):
    """A source that cannot be read: missing files, unsupported URIs, paths executors cannot see."""


class ChecksumMismatchError(InputError):
    """A payload whose sha256 differs from the one the dataset registry knows."""


class DatasetNotFoundError(InputError):
    """An output directory that holds no complete ingested dataset."""


class EnvironmentMismatchError(InputError):
    """A setting this environment's installed libraries cannot serve (petastorm on Spark 4 or pyarrow >= 15)."""


class LauncherUnavailableError(EnvironmentMismatchError):
    """A launcher whose package is not installed or whose hardware is absent; the message names it and the fix."""


class CheckpointError(InputError):
    """A checkpoint that cannot be resumed from: unreadable, refused by weights-only loading (it would run code), or
    missing entries.  (A checkpoint of another seed, dataset or global batch is refused by the loader:
    ``LoaderStateError``.)"""


class LoaderStateError(InputError):
    """A loader state (a checkpoint's) that this run cannot honour: another seed, dataset, row count or global batch
    size, or a global batch that the world size does not divide."""


def invalid(name: str, value: object, must: str, error: type[ValueError] = ValueError) -> ValueError:
    """The one form of an "Invalid X" error (mosaicml-streaming's style guide, torchvision's ``verify_str_arg``):
    ``Invalid {name}: {value!r}. Must be {must}.``, a URI's credentials redacted.  Returns the exception for the
    caller to raise."""
    from spark_mnist.paths import redact  # here: paths imports this module

    return error(redact(f"Invalid {name}: {value!r}. Must be {must}."))


def check_choice(name: str, value: Any, valid: Collection, error: type[ValueError] = ValueError) -> Any:
    """``value`` when it is one of ``valid``.

    Raises:
        ``error`` (``ValueError`` by default): ``Invalid {name}: {value!r}. Must be one of 'a', 'b'.``
    """
    if value not in valid:
        raise invalid(name, value, "one of " + ", ".join(map(repr, valid)), error)
    return value


def require_extra(module: str, extra: str, what: str):
    """``import module``, or :class:`EnvironmentMismatchError`: ``{what} needs {module}, which is not installed
    here: pip install 'spark-mnist[{extra}]'`` (the mosaicml-streaming way with optional dependencies)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise EnvironmentMismatchError(
            f"{what} needs {module}, which is not installed here: pip install 'spark-mnist[{extra}]' (every "
            f"Databricks ML runtime and serverless GPU environment ships it)"
        ) from None
