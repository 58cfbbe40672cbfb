"""The errors spark-mnist raises for bad input.

Every one of them is a ``ValueError`` subclass whose message names the file (or setting) at fault and says what was
expected and what was found.  The CLI turns any :class:`InputError` into one line on stderr and exit code 2.
"""

from __future__ import annotations


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
