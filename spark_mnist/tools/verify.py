"""Check a directory of gz IDX files against the dataset registry, on the driver alone: no Spark.

``spark-mnist verify`` answers "would ingest accept these files, and are they the published ones?" before a cluster
is involved.  Every file is parsed with :func:`spark_mnist.formats.idx.parse_idx` (the IDX spec on the MNIST page), each
split is checked with :func:`spark_mnist.datasets.validate_split`, and each payload sha256 (of the decompressed
file) is compared with the registry's.  The file names are exactly the ones ingest reads.
"""

import os
import textwrap
from dataclasses import dataclass

import numpy as np

from spark_mnist.datasets import IMAGES, LABELS, SPLITS, DatasetSpec, get_dataset, hash_mismatch_message, validate_split
from spark_mnist.errors import ChecksumMismatchError, DatasetMismatchError, InputError, SourceError
from spark_mnist.formats.idx import ParsedIdx, parse_idx
from spark_mnist.paths import require_local

__all__ = ["FileReport", "SplitReport", "VerifyReport", "verify_source", "verify_file", "format_table"]

# A file's or split's status; a file whose payload differs from the published sha256 is "hash-mismatch".
OK = "ok"
HASH_MISMATCH = "hash-mismatch"


@dataclass(frozen=True)
class FileReport:
    """What :func:`verify_source` found for one file.

    ``status`` is ``"ok"``, ``"hash-mismatch"``, ``"missing"`` or ``"error: <message>"``; ``rows`` the first
    dimension and ``shape`` the full IDX shape (``None`` when unreadable); ``sha256`` the hex sha256 of the
    decompressed payload; ``expected`` the registry's (``None`` where none is published).
    """

    name: str
    status: str
    rows: int | None = None
    shape: tuple[int, ...] | None = None
    sha256: str | None = None
    expected: str | None = None


@dataclass(frozen=True)
class SplitReport:
    """One split: ``status`` ``"ok"``, ``"incomplete"`` (a file missing or unreadable) or ``"error: <message>"``
    (from :func:`validate_split`: counts, image shape, label range); ``rows`` the label count; ``expected_rows`` the
    published size (``None`` when unknown); ``histogram`` the count of each label value 0..max (length at least
    ``num_classes``), ``None`` when the labels could not be read."""

    split: str
    status: str
    rows: int | None = None
    expected_rows: int | None = None
    histogram: tuple[int, ...] | None = None


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`verify_source`.  ``ok`` is true when every file and split is ``"ok"``; a
    ``"hash-mismatch"`` counts against it unless the report was made with ``strict=False``."""

    dataset: str
    directory: str
    files: tuple[FileReport, ...]
    splits: tuple[SplitReport, ...]
    strict: bool = True

    @property
    def ok(self) -> bool:
        """Whether every file and split is ``"ok"`` (hash mismatches allowed when not ``strict``)."""
        allowed = {OK} if self.strict else {OK, HASH_MISMATCH}
        return all(f.status in allowed for f in self.files) and all(s.status == OK for s in self.splits)

    @property
    def problems(self) -> list[str]:
        """One line per file or split that is not ``"ok"``, with the full message (and full hashes)."""
        lines = []
        for f in self.files:
            path = os.path.join(self.directory, f.name)
            if f.status == HASH_MISMATCH:
                lines.append(hash_mismatch_message(self.dataset, path, f.sha256 or "", f.expected or ""))
            elif f.status != OK:
                lines.append(f"{path}: {'file not found' if f.status == 'missing' else f.status}")
        return lines + [f"split {s.split}: {s.status}" for s in self.splits if s.status.startswith("error")]


def verify_file(
    spec: DatasetSpec, split: str, kind: str, path: str | os.PathLike, *, name: str | None = None
) -> ParsedIdx:
    """Check that ``path`` is a usable copy of ``spec``'s ``split``/``kind`` file (``kind`` ``"images"`` or
    ``"labels"``), as downloads and local copies must be before they are installed under the final name.

    Checks, in order: the file parses as IDX (:func:`spark_mnist.formats.idx.parse_idx`); its payload sha256 equals the
    registry's where one is published; images are (N, H, W) uint8 of ``spec.image_shape`` and labels (N,) uint8
    below ``spec.num_classes`` (:func:`spark_mnist.datasets.validate_split`); N equals the
    published ``spec.split_sizes[split]`` where known (a download is the whole published split, not a subset).

    Args:
        name: how messages name the file (default: the path).

    Returns:
        The :class:`~spark_mnist.formats.idx.ParsedIdx` (array, payload sha256, payload bytes).

    Raises:
        IdxFormatError: not an IDX file (an HTML page, truncated or corrupt gzip, wrong magic, ...).
        ChecksumMismatchError: a payload sha256 other than the published one.
        DatasetMismatchError: wrong image shape or dtype, labels out of range, or a row count other than published.
    """
    name = name or os.fspath(path)
    parsed = parse_idx(path, name)
    if (expected := spec.file(split, kind).sha256) is not None and parsed.sha256 != expected:
        raise ChecksumMismatchError(hash_mismatch_message(spec.name, name, parsed.sha256, expected))
    array, rows = parsed.array, len(parsed.array)
    if kind == IMAGES:
        validate_split(spec, array, np.zeros(rows, dtype=np.uint8), name, "(labels)")
    else:
        validate_split(spec, np.broadcast_to(np.uint8(0), (rows, *spec.image_shape)), array, "(images)", name)
    if (expected_rows := spec.split_sizes.get(split)) is not None and rows != expected_rows:
        raise DatasetMismatchError(f"{name}: {rows} rows: {spec.name}'s published {split} split has {expected_rows}")
    return parsed


def verify_source(
    directory: str | os.PathLike, dataset: str | DatasetSpec = "mnist", *, strict: bool = True
) -> VerifyReport:
    """Parse and check the four IDX files of ``dataset`` in ``directory``, without Spark.

    Args:
        directory: a local directory, ``file:/...``, ``/dbfs/...`` (or ``dbfs:/...`` on Databricks) or
            ``/Volumes/...``, normalised with :func:`spark_mnist.paths.normalize_uri`.
        dataset: a registry name (:func:`spark_mnist.datasets.get_dataset`) or a :class:`DatasetSpec`.
        strict: when true (the default) a payload sha256 other than the registry's makes ``report.ok`` false.

    Returns:
        :class:`VerifyReport`: per file name, rows, shape, payload sha256, expected sha256 and status; per split the
        validation status and a label histogram (counts per label value).  Problems in the files are reported, not
        raised.  Memory: one file's decoded array at a time (an MNIST train-images file is 47 MB).

    Raises:
        InputError: an unknown dataset name.
        SourceError: ``directory`` is not a local directory (missing, or an object-store URI).
    """
    spec = dataset if isinstance(dataset, DatasetSpec) else get_dataset(dataset)
    root = require_local(directory, "verify")  # absolute and normalised
    if not os.path.isdir(root):
        raise SourceError(f"{root}: source directory not found")
    files, splits = [], []
    for split in SPLITS:
        names, arrays = {kind: spec.file(split, kind).name for kind in (IMAGES, LABELS)}, {}
        for kind, name in names.items():
            path, expected = os.path.join(root, name), spec.file(split, kind).sha256
            try:
                parsed = parse_idx(path)
            except InputError as e:  # "missing" where there is no such file (or a directory of its name)
                status = "missing" if not os.path.isfile(path) else f"error: {str(e).removeprefix(f'{path}: ')}"
                files.append(FileReport(name, status, expected=expected))
                continue
            array, status = parsed.array, OK if expected in (None, parsed.sha256) else HASH_MISMATCH
            files.append(FileReport(name, status, len(array), tuple(array.shape), parsed.sha256, expected))
            # Of the images only shape and dtype matter from here on (a view of one zero); labels make the histogram.
            arrays[kind] = array if kind == LABELS else np.broadcast_to(np.zeros((), array.dtype), array.shape)
        labels, histogram, status = arrays.get(LABELS), None, "incomplete"  # "incomplete": a file missing or unreadable
        if labels is not None and labels.ndim == 1 and labels.dtype.kind in "ui" and (labels >= 0).all():
            histogram = tuple(int(c) for c in np.bincount(labels.astype(np.int64), minlength=spec.num_classes))
        if len(arrays) == 2:
            try:
                validate_split(spec, arrays[IMAGES], arrays[LABELS], names[IMAGES], names[LABELS])
                status = OK
            except InputError as e:
                status = f"error: {e}"
        # The split's rows are its labels file's (the last report made), None where that could not be read.
        splits.append(SplitReport(split, status, files[-1].rows, spec.split_sizes.get(split), histogram))
    return VerifyReport(spec.name, root, tuple(files), tuple(splits), strict)


def _cut(text: str | None, width: int) -> str | None:
    return text if text is None or len(text) <= width else text[: width - 3] + "..."


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    """Left-aligned columns under a rule; ``None`` shown as ``-``."""
    cells = [header, *(tuple("-" if value is None else str(value) for value in row) for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    return [lines[0], "  ".join("-" * w for w in widths), *lines[1:]]


def format_table(report: VerifyReport, *, width: int = 100) -> str:
    """``report`` as plain text: a table of files (name, rows, shape, status, payload sha256 and expected, both
    shortened to 16 hex digits), a table of splits with their label histograms (``label:count``, wrapped at
    ``width`` characters), then one line per problem with full messages and hashes, then ``OK`` or ``FAILED``.
    """
    files = []
    for f in report.files:
        shape = None if f.shape is None else "x".join(map(str, f.shape))
        # Digests shortened to 16 hex digits: the problems list gives them whole.
        expected = _cut(f.expected, 19) or "(none published)"
        files.append((f.name, f.rows, shape, _cut(f.status, 40), _cut(f.sha256, 19), expected))
    out = [f"dataset {report.dataset} in {report.directory}", ""]
    out += _table(("file", "rows", "shape", "status", "sha256", "expected"), files)
    splits = [(s.split, s.rows, s.expected_rows, _cut(s.status, 60)) for s in report.splits]
    out += ["", *_table(("split", "rows", "published", "status"), splits)]
    for s in report.splits:
        if s.histogram is not None:
            counts = " ".join(f"{label}:{count}" for label, count in enumerate(s.histogram))
            out += textwrap.wrap(f"{s.split} labels: {counts}", width=width, subsequent_indent="    ")
    if report.problems:
        out += ["", "problems:", *(f"  {line}" for line in report.problems)]
    if not report.strict and any(f.status == HASH_MISMATCH for f in report.files):
        out.append("(hash mismatches allowed: strict=False)")
    out += ["", "OK" if report.ok else "FAILED"]
    return "\n".join(out) + "\n"
