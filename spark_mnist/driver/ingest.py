"""Driver-side ingest: gz IDX bytes -> validated numpy arrays -> Parquet shards + ``_manifest.json``.

The order of work is what makes bad input cheap and failures harmless:

1. read the four files' bytes with Spark's ``binaryFile`` source (:mod:`spark_mnist.driver.sources`);
2. parse and check every file on the driver (:mod:`spark_mnist.driver.inputs`, :mod:`spark_mnist.formats.idx`,
   :func:`spark_mnist.datasets.validate_split`), before anything is written;
3. write both splits into a staging directory beside ``OUT`` with one Spark job, each task writing its own shard
   (:func:`write_pieces`), then the manifest;
4. commit: remove the scratch files that task attempts killed outright left in staging, then move the staging
   directory to ``OUT``, replacing any previous dataset (:mod:`spark_mnist.driver.commit`).

Readers see either the previous complete dataset or the new one, never a mix.  The shard layout is the contract in
:mod:`spark_mnist.shards.contract`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np

from spark_mnist import __version__
from spark_mnist import fs as files  # not `fs`: arrow_target and write_shard import pyarrow.fs as fs
from spark_mnist.datasets import SPLITS, DatasetSpec, get_dataset, upright
from spark_mnist.driver import session
from spark_mnist.driver.commit import commit, recover, scratch_name, staging_for
from spark_mnist.driver.inputs import SplitInput, check_hashes, open_idx_split, read_npz
from spark_mnist.driver.sources import read_files, read_rows
from spark_mnist.driver.stages import StageClock
from spark_mnist.errors import InputError, SourceError, invalid
from spark_mnist.paths import Location, normalize_uri
from spark_mnist.shards import contract
from spark_mnist.shards.parquet import write_rows

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

# Parquet row-group target: ~1 MiB is ~1,300 MNIST rows, so 60,000 training rows make ~45 row groups and every rank
# of a typical run (up to 8 x a few GPUs) has several of them.
DEFAULT_ROW_GROUP_BYTES = 2**20
# Images held on the driver at once while ingesting: 1M MNIST images are ~750 MiB.
DEFAULT_CHUNK_ROWS = 1_000_000


def shard_bounds(rows: int, num_shards: int) -> np.ndarray:
    """Row boundaries of ``num_shards`` contiguous shards over ``rows`` rows: shard k is ``[b[k], b[k+1])``; sizes
    differ by at most one.  ``num_shards`` is capped at ``rows`` so that no shard is empty."""
    shards = max(1, min(num_shards, rows))
    return np.linspace(0, rows, shards + 1).round().astype(np.int64)


@dataclass(frozen=True)
class Piece:
    """Consecutive shards of one split, in memory: shard ``first_shard + k`` holds global rows
    ``[bounds[k], bounds[k+1])``; ``images`` (n, H, W) uint8 and ``labels`` (n,) hold rows ``bounds[0] ..
    bounds[-1]``."""

    split: str
    first_shard: int
    bounds: tuple[int, ...]
    images: np.ndarray
    labels: np.ndarray
    # ``reread(lo, hi)``: the split's images ``[lo, hi)`` read again from the source file in a Spark task, exactly as
    # ``images`` holds them (:func:`rows_again`); ``None`` where the rows can only come from the driver.
    reread: Optional[Callable[[int, int], np.ndarray]] = None


def rows_again(spec: DatasetSpec, uri: str, lo: int, hi: int) -> np.ndarray:
    """Images ``[lo, hi)`` of the IDX file ``uri`` in a Spark task, as the driver holds them: read again
    (:func:`spark_mnist.driver.sources.read_rows`) and stored upright (:func:`spark_mnist.datasets.upright`)."""
    return upright(spec, read_rows(uri, lo, hi))


def images_checksum(images: np.ndarray) -> int:
    """CRC-32 of ``images``' bytes in C order: what a task that read its rows again compares with the driver's."""
    return zlib.crc32(np.ascontiguousarray(images).data)


def arrow_target(location: Location) -> str:
    """Where pyarrow opens ``location`` in a Spark task: its local path (local disk, ``/dbfs`` FUSE, ``/Volumes``),
    else its URI (``s3://``, ``gs://``, ``hdfs://``).

    Raises:
        SourceError: a URI pyarrow cannot write to (e.g. ``wasbs://``, or ``abfss://`` before pyarrow had Azure); the
            message says what to use instead.
    """
    from pyarrow import fs

    target = location.local_path if location.is_local else location.uri
    try:
        fs.FileSystem.from_uri(target)
    except (ValueError, NotImplementedError, OSError) as e:  # pyarrow's ArrowInvalid/ArrowNotImplementedError
        raise SourceError(f"{location.uri}: cannot write Parquet shards there ({e}); use a local path, dbfs:/..., "
                          f"/dbfs/..., /Volumes/... or an s3://, gs:// or hdfs:// URI") from None
    return target


def write_shard(target: str, split: str, shard: int, images: np.ndarray, labels: np.ndarray, start: int,
                rows_per_group: int) -> None:
    """Write one shard, ``target/<split>/part-NNNNN.parquet``: global rows ``start ..`` of ``images`` (n, H, W)
    uint8 and ``labels`` (n,), in row groups of ``rows_per_group`` rows (Snappy, no dictionary encoding: every image
    is a distinct value).  Runs in a Spark task.

    The file is written under a hidden name unique to this task attempt and moved into place when complete, so a
    retried or speculative attempt never leaves a half-written shard under the final name (:func:`scratch_name`).
    An attempt that fails with an exception removes its file; one killed outright (executor lost, SIGKILL) cannot,
    and :func:`commit` removes what it left.
    """
    from pyarrow import fs
    from pyspark import TaskContext

    filesystem, root = fs.FileSystem.from_uri(target)
    name = contract.shard_name(shard)
    context = TaskContext.get()
    attempt = context.taskAttemptId() if context is not None else uuid.uuid4().hex
    final, scratch = f"{root}/{split}/{name}", f"{root}/{split}/{scratch_name(name, attempt)}"
    try:
        with filesystem.open_output_stream(scratch) as sink:
            write_rows(sink, start, images, labels, rows_per_group)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # the stream may have failed before creating the file
            filesystem.delete_file(scratch)
        raise
    filesystem.move(scratch, final)


REPORT_SCHEMA = "unit long, rows long"
# Over Spark Connect the arrays travel as rows of at most this many bytes of images (a row group's worth of an
# MNIST shard is ~1 MiB): serverless compute refuses local rows over 128 MiB.
FRAGMENT_BYTES = 4 * 2**20


@dataclass(frozen=True)
class WritePlan:
    """What every write task needs besides the arrays, small enough to travel in its closure: the shards of one
    write job (unit ``u`` of the job is shard ``shards[u]`` = rows ``[bounds[p][k], bounds[p][k+1])`` of piece ``p``,
    where ``(p, k) = units[u]``) and where and how to write them.

    Both ways of running the job (:func:`write_pieces`) end in :meth:`write`, so a classic session and a Spark
    Connect session write the same files, byte for byte.
    """

    target: str
    units: tuple[tuple[int, int], ...]
    shards: tuple[tuple[str, int], ...]
    bounds: tuple[tuple[int, ...], ...]
    rows_per_group: int
    image_shape: tuple[int, ...]
    label_dtypes: tuple[str, ...]

    @classmethod
    def of(cls, pieces: list[Piece], target: str, row_group_bytes: int) -> "WritePlan":
        """The plan of one write job over ``pieces`` into ``target`` (:func:`arrow_target`), row groups of about
        ``row_group_bytes`` of images."""
        units = tuple((p, k) for p, piece in enumerate(pieces) for k in range(len(piece.bounds) - 1))
        image_shape = tuple(int(n) for n in pieces[0].images.shape[1:])
        return cls(target=target, units=units,
                   shards=tuple((pieces[p].split, pieces[p].first_shard + k) for p, k in units),
                   bounds=tuple(piece.bounds for piece in pieces),
                   rows_per_group=max(1, row_group_bytes // max(1, int(np.prod(image_shape)))),
                   image_shape=image_shape, label_dtypes=tuple(piece.labels.dtype.str for piece in pieces))

    def rows(self, unit: int) -> tuple[int, int]:
        """Unit ``unit``'s rows ``[lo, hi)``, relative to the first row of its piece."""
        p, k = self.units[unit]
        return self.bounds[p][k] - self.bounds[p][0], self.bounds[p][k + 1] - self.bounds[p][0]

    @property
    def fragment_rows(self) -> int:
        """Rows of a fragment over Spark Connect: :data:`FRAGMENT_BYTES` of images, at least one image."""
        return max(1, FRAGMENT_BYTES // max(1, int(np.prod(self.image_shape))))

    def fragments(self, unit: int) -> int:
        """How many fragments unit ``unit`` travels in over Spark Connect."""
        lo, hi = self.rows(unit)
        return -(-(hi - lo) // self.fragment_rows)

    def expected(self) -> dict[int, int]:
        """Rows per unit."""
        return {unit: hi - lo for unit in range(len(self.units)) for lo, hi in [self.rows(unit)]}

    def write(self, unit: int, images: np.ndarray, labels: np.ndarray) -> dict[str, list[int]]:
        """Write unit ``unit``'s shard from its ``images`` (n, H, W) uint8 and ``labels`` (n,); runs in a Spark
        task.  Returns the task's report row, ``{"unit": [unit], "rows": [n]}``."""
        p, k = self.units[unit]
        split, shard = self.shards[unit]
        write_shard(self.target, split, shard, images, labels, self.bounds[p][k], self.rows_per_group)
        return {"unit": [unit], "rows": [len(labels)]}


def write_pieces(spark: "SparkSession", pieces: list[Piece], staging: Location, *,
                 row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES) -> None:
    """Write every piece's shards with one Spark job: task ``t`` writes shard ``t`` of the job as
    ``staging/<split>/part-NNNNN.parquet`` (:func:`write_shard`, through :meth:`WritePlan.write`).

    Each task cuts its shard into Arrow record batches (no row passes through Python one at a time) and writes them
    with pyarrow, one row group of ~``row_group_bytes`` each.  Each task writes its own part and the driver commits
    the whole staging directory later, the pattern of mosaicml-streaming's ``dataframe_to_mds``: Spark's own Parquet
    writer would convert every row from Arrow to its row format and run Hadoop's output committer, which measured
    here doubled the time of the whole write.  Spark's cost is per job and per task, so all pieces share one job and
    each shard is one task.  How the arrays reach the tasks depends on the session:

    * classic: once, as a broadcast variable (:func:`spark_mnist.driver.session.shipped_to_executors`), under
      ``spark.range(units)`` with one partition per shard;
    * Spark Connect (no broadcast variables, no JVM), where the rows can be read again from IDX files (one write
      job): not at all; each task of that same ``spark.range`` reads its rows from the source file and checks them
      against the driver's CRC-32 (:func:`_write_from_sources`);
    * Spark Connect otherwise (a Keras npz, or several write jobs): as one Arrow relation (``createDataFrame``) of
      rows of at most
      :data:`FRAGMENT_BYTES` of images, joined with a broadcast hint to that same ``spark.range``, so partition ``t``
      again receives exactly shard ``t``'s rows (:func:`_write_over_connect`).  pyspark sends a relation under
      ``spark.sql.session.localRelationCacheThreshold`` (64 MiB) inline and uploads a larger one as chunked
      artifacts, so no gRPC message exceeds the server's limit (128 MiB).

    Raises:
        SourceError: ``staging`` is somewhere pyarrow cannot write (:func:`arrow_target`).
        RuntimeError: the job did not report every shard with its rows.
    """
    plan = WritePlan.of(pieces, arrow_target(staging), row_group_bytes)
    for split in dict.fromkeys(piece.split for piece in pieces):
        files.makedirs(staging.join(split))
    if session.is_connect(spark) and all(piece.reread is not None for piece in pieces):
        written = _write_from_sources(spark, pieces, plan)
    elif session.is_connect(spark):
        written = _write_over_connect(spark, pieces, plan)
    else:
        written = _write_with_broadcast(spark, pieces, plan)
    expected = plan.expected()
    reported = {row.unit: row.rows for row in written}
    if reported != expected:
        missing = [f"{split}/{contract.shard_name(shard)}" for u, (split, shard) in enumerate(plan.shards)
                   if reported.get(u) != expected[u]]
        raise RuntimeError(f"{staging.uri}: the write job did not report these shards with their rows: "
                           f"{', '.join(missing)}")


def _units_frame(spark: "SparkSession", plan: WritePlan):
    """``spark.range`` over the job's units, one partition each: the write job's tasks."""
    return spark.range(len(plan.units), numPartitions=len(plan.units))


def _write_with_broadcast(spark: "SparkSession", pieces: list[Piece], plan: WritePlan) -> list:
    """The classic session's write job: the arrays as one broadcast variable, the units as ``spark.range``."""
    with session.shipped_to_executors(spark, [(piece.images, piece.labels) for piece in pieces]) as shipped:
        def write_units(batches: Iterator) -> Iterator:
            import pyarrow as pa

            arrays = shipped.value
            for batch in batches:
                for unit in batch.column(0).to_pylist():
                    images, labels = arrays[plan.units[unit][0]]
                    lo, hi = plan.rows(unit)
                    yield pa.RecordBatch.from_pydict(plan.write(unit, images[lo:hi], labels[lo:hi]))

        return _units_frame(spark, plan).mapInArrow(write_units, REPORT_SCHEMA).collect()


def _write_from_sources(spark: "SparkSession", pieces: list[Piece], plan: WritePlan) -> list:
    """The Spark Connect write job where every piece can be read again (:attr:`Piece.reread`): nothing but the
    labels and a CRC-32 per shard travel; each task of ``spark.range(units)`` reads its rows from the source file,
    checks them against the driver's checksum, and writes its shard.

    Raises (in the job):
        SourceError: a task's rows differ from the driver's (the file changed since it was checked).
    """
    rereads = [piece.reread for piece in pieces]
    labels = [piece.labels for piece in pieces]
    checksums = []
    for unit, (p, _) in enumerate(plan.units):
        lo, hi = plan.rows(unit)
        checksums.append(images_checksum(pieces[p].images[lo:hi]))

    def write_units(batches: Iterator) -> Iterator:
        import pyarrow as pa

        for batch in batches:
            for unit in batch.column(0).to_pylist():
                p, k = plan.units[unit]
                lo, hi = plan.rows(unit)
                images = rereads[p](plan.bounds[p][k], plan.bounds[p][k + 1])
                if images_checksum(images) != checksums[unit]:
                    split, shard = plan.shards[unit]
                    raise SourceError(f"{split}/{contract.shard_name(shard)}: rows {plan.bounds[p][k]}-"
                                      f"{plan.bounds[p][k + 1]} of the source differ from what the driver checked "
                                      f"(the file changed during the ingest?)")
                yield pa.RecordBatch.from_pydict(plan.write(unit, images, labels[p][lo:hi]))

    return _units_frame(spark, plan).mapInArrow(write_units, REPORT_SCHEMA).collect()


def fragments_table(pieces: list[Piece], plan: WritePlan):
    """The job's arrays as an Arrow table of fragments: ``unit`` (long), ``part`` (int, the fragment's place in its
    unit), ``images`` and ``labels`` (binary: consecutive rows' raw bytes, C order), :attr:`WritePlan.fragment_rows`
    rows a fragment (fewer in a unit's last), in one record batch."""
    import pyarrow as pa

    units, parts, images, labels = [], [], [], []
    for unit, (p, _) in enumerate(plan.units):
        lo, hi = plan.rows(unit)
        starts = np.append(np.arange(lo, hi, plan.fragment_rows), hi)
        units.append(pa.array(np.full(len(starts) - 1, unit, dtype=np.int64)))
        parts.append(pa.array(np.arange(len(starts) - 1, dtype=np.int32)))
        for name, array, out in (("images", pieces[p].images, images), ("labels", pieces[p].labels, labels)):
            flat = np.ascontiguousarray(array[lo:hi]).reshape(-1).view(np.uint8)
            width = flat.size // max(1, hi - lo)
            offsets = pa.py_buffer(((starts - lo) * width).astype(np.int32))
            out.append(pa.Array.from_buffers(pa.binary(), len(starts) - 1, [None, offsets, pa.py_buffer(flat)]))
    # One chunk per column: Spark 4.0.0's Connect server reads only the first record batch of a local relation.
    return pa.Table.from_arrays([pa.concat_arrays(c) for c in (units, parts, images, labels)],
                                names=["unit", "part", "images", "labels"])


def _write_over_connect(spark: "SparkSession", pieces: list[Piece], plan: WritePlan) -> list:
    """The Spark Connect write job: the arrays as one Arrow relation of fragments (:func:`fragments_table`),
    broadcast-joined to the units, so task ``t`` gets all of unit ``t``'s fragments; it checks it has every one
    (a unit split across tasks fails the job rather than writing a partial shard) and writes the shard."""
    data = spark.createDataFrame(fragments_table(pieces, plan))
    tasks = (_units_frame(spark, plan).withColumnRenamed("id", "unit")
             .join(data.hint("broadcast"), "unit")
             .select("unit", "part", "images", "labels"))

    def write_fragments(batches: Iterator) -> Iterator:
        import pyarrow as pa

        received: dict[int, list[tuple[int, bytes, bytes]]] = {}
        for batch in batches:
            columns = [batch.column(name).to_pylist() for name in ("unit", "part", "images", "labels")]
            for unit, part, images, labels in zip(*columns):
                received.setdefault(unit, []).append((part, images, labels))
        for unit, fragments in sorted(received.items()):
            fragments.sort(key=lambda fragment: fragment[0])
            parts = [part for part, _, _ in fragments]
            if parts != list(range(plan.fragments(unit))):
                split, shard = plan.shards[unit]
                raise RuntimeError(f"{split}/{contract.shard_name(shard)}: the task received fragments {parts}, "
                                   f"not all {plan.fragments(unit)}")
            images = np.frombuffer(b"".join(f[1] for f in fragments), np.uint8).reshape(-1, *plan.image_shape)
            labels = np.frombuffer(b"".join(f[2] for f in fragments), np.dtype(plan.label_dtypes[plan.units[unit][0]]))
            yield pa.RecordBatch.from_pydict(plan.write(unit, images, labels))

    return tasks.mapInArrow(write_fragments, REPORT_SCHEMA).collect()


def chunk_groups(bounds: np.ndarray, chunk_rows: int) -> list[tuple[int, int]]:
    """Consecutive shards grouped so that each group holds at most ``chunk_rows`` rows (at least one shard):
    ``[(first shard, end shard), ...]``.  A streamed split is read and written one group at a time."""
    groups, k, shards = [], 0, len(bounds) - 1
    while k < shards:
        end = k + 1
        while end < shards and bounds[end + 1] - bounds[k] <= chunk_rows:
            end += 1
        groups.append((k, end))
        k = end
    return groups


def plan_jobs(rows: dict[str, int], num_shards: int, chunk_rows: int
              ) -> tuple[dict[str, np.ndarray], list[list[tuple[str, int, int]]]]:
    """Shard boundaries per split and the Spark write jobs: each job a list of ``(split, first shard, end shard)``
    holding at most ``chunk_rows`` rows (at least one shard).

    ``num_shards`` is raised where needed so that no shard exceeds ``chunk_rows``.  MNIST-sized datasets are one
    job; larger splits are read from their streams and written a chunk at a time.
    """
    bounds = {name: shard_bounds(n, max(num_shards, -(-n // chunk_rows))) for name, n in rows.items()}
    jobs: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] = []
    current_rows = 0
    for name, split_bounds in bounds.items():
        for first, end in chunk_groups(split_bounds, chunk_rows):
            group_rows = int(split_bounds[end] - split_bounds[first])
            if current and current_rows + group_rows > chunk_rows:
                jobs.append(current)
                current, current_rows = [], 0
            current.append((name, first, end))
            current_rows += group_rows
    if current:
        jobs.append(current)
    return bounds, jobs


def write_splits(spark: "SparkSession", spec: DatasetSpec, splits: list[SplitInput], staging: Location, *,
                 num_shards: int, chunk_rows: int, row_group_bytes: int, clock: StageClock | None = None
                 ) -> dict[str, list[int]]:
    """Write every split in contiguous shards under ``staging/<split>/``, holding at most ``chunk_rows`` images on
    the driver at a time (see :func:`plan_jobs`).

    ``clock`` counts the decompression of the images (``read_images``) and the write jobs (``write_pieces``).

    Returns:
        Rows per shard of each split, in shard order.
    """
    clock = clock or StageClock()
    inputs = {split.name: split for split in splits}
    bounds, jobs = plan_jobs({split.name: len(split.labels) for split in splits}, num_shards, chunk_rows)
    for job in jobs:
        pieces = []
        for name, first, end in job:
            lo, hi = int(bounds[name][first]), int(bounds[name][end])
            images = upright(spec, clock.timed("read_images", inputs[name].take)(hi - lo))
            # One job: each task reads its rows again once at most; over several jobs a gz file would be
            # decompressed from its start again for every job, so those rows travel from the driver.
            uri = inputs[name].images_uri
            reread = functools.partial(rows_again, spec, uri) if uri is not None and len(jobs) == 1 else None
            pieces.append(Piece(name, first, tuple(int(b) for b in bounds[name][first:end + 1]), images,
                                inputs[name].labels[lo:hi], reread))
        with clock.stage("write_pieces"):
            write_pieces(spark, pieces, staging, row_group_bytes=row_group_bytes)
        log.info("wrote %s", ", ".join(f"{p.split} rows {p.bounds[0]}-{p.bounds[-1]}" for p in pieces))
    return {name: np.diff(split_bounds).tolist() for name, split_bounds in bounds.items()}


def build_manifest(spec: DatasetSpec, source: Location, records: list[dict[str, Any]],
                   splits: list[SplitInput], rows_per_shard: dict[str, list[int]]) -> dict[str, Any]:
    """The ``_manifest.json`` content: dataset, source files (uri, bytes, payload sha256), per-split rows,
    shards and label histogram, schema and package versions."""
    return {
        "schema_version": contract.SCHEMA_VERSION,
        "package_version": __version__,
        "dataset": spec.name,
        "classes": list(spec.classes),
        "image_shape": list(spec.image_shape),
        "columns": {name: spark_type for name, (spark_type, _) in contract.COLUMN_TYPES.items()},
        "created_unix": round(time.time(), 3),
        "source": {"uri": source.uri, "files": records},
        "splits": {
            split.name: {
                "rows": int(len(split.labels)),
                "files": [contract.shard_name(k) for k in range(len(rows_per_shard[split.name]))],
                "rows_per_shard": rows_per_shard[split.name],
                "label_histogram": np.bincount(split.labels, minlength=spec.num_classes).tolist(),
            }
            for split in splits
        },
    }


def read_sources(spark: "SparkSession", spec: DatasetSpec, source_dir: Location, stack: contextlib.ExitStack,
                 clock: StageClock) -> tuple[list[SplitInput], list[dict[str, Any]]]:
    """Both splits of ``spec`` from ``source_dir`` (a directory of IDX files, or a Keras ``mnist.npz``), checked as
    far as headers and labels allow; images files stay open as streams on ``stack``.  Driver-side.

    Returns:
        The splits (train, test) and the manifest records of the files read so far.
    Raises:
        InputError: as :func:`~spark_mnist.driver.inputs.open_idx_split` and
            :func:`~spark_mnist.driver.inputs.read_npz`.
    """
    if source_dir.uri.endswith(".npz"):
        return read_npz(spark, spec, source_dir)
    files = clock.timed("read_files", read_files)(spark, source_dir, [f.name for f in spec.all_files()])
    splits, records = [], []
    for split in SPLITS:
        split_input, split_records = clock.timed("open_idx_split", open_idx_split)(stack, spec, split, files)
        splits.append(split_input)
        records.extend(split_records)
    return splits, records


def ingest(spark: "SparkSession", source: str, output: str, *, dataset: str = "fashion-mnist",
           num_shards: int | None = None, row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
           chunk_rows: int = DEFAULT_CHUNK_ROWS, strict: bool = False, stages: dict[str, float] | None = None
           ) -> dict[str, Any]:
    """Ingest the four standard gz IDX files of ``dataset`` under ``source`` into Parquet shards under ``output``.

    Runs on the driver.  ``source`` and ``output`` may be local paths, ``file:/``, ``dbfs:/``, ``/dbfs/`` or
    ``/Volumes/...`` (see :func:`spark_mnist.paths.normalize_uri`); ``source`` may also name a Keras
    ``mnist.npz`` file instead of a directory.  Images are streamed: the driver holds at most ``chunk_rows``
    decompressed images at a time (plus all labels), so datasets far larger than its memory ingest.

    ``num_shards`` (per split) defaults to Spark's default parallelism, one shard per core.  Ranks are fed from
    row groups (``row_group_bytes``, ~1,300 MNIST rows), not shards, so few shards cost the loader nothing.

    Structure, shapes, counts and labels are checked before anything is written; a defect found later in a
    streamed file (truncation, a bad gzip CRC) or a hash mismatch under ``strict`` discards the staging
    directory, so ``output`` never sees it.

    ``stages``, when given, receives the seconds of each stage (:class:`~spark_mnist.driver.stages.StageClock`):
    ``read_files`` (Spark's binaryFile job), ``open_idx_split`` (headers and labels), ``read_images`` (the streamed
    decompression), ``write_pieces`` (the write jobs), ``commit`` and ``other``; they add up to the call's time.

    Returns:
        The manifest written to ``output/_manifest.json``.
    Raises:
        InputError: (``SourceError``, ``IdxFormatError``, ``DatasetMismatchError``, ``ChecksumMismatchError``) bad
            input; nothing is written to ``output``.
        InputError: ``num_shards``, ``row_group_bytes`` or ``chunk_rows`` below 1.
        SourceError: an ``output`` the write tasks cannot open with pyarrow (e.g. ``wasbs://``).
    """
    if num_shards is None:
        # One shard per Spark core: the write is one wave of tasks, and Spark's cost is per task.
        num_shards = session.default_parallelism(spark)
    for name, value in (("num_shards", num_shards), ("row_group_bytes", row_group_bytes), ("chunk_rows", chunk_rows)):
        if value < 1:
            raise invalid(name, value, "at least 1", InputError)
    clock = StageClock()
    spec = get_dataset(dataset)
    source_dir, out = normalize_uri(source), normalize_uri(output)
    arrow_target(out)  # an output the write tasks could not open is refused before anything is read
    with contextlib.ExitStack() as stack:
        splits, records = read_sources(spark, spec, source_dir, stack, clock)
        log.info("checked the headers and labels of %s: %s", source_dir.uri,
                 ", ".join(f"{s.name} {len(s.labels)} rows" for s in splits))
        recover(out)
        staging = staging_for(out)
        try:
            rows_per_shard = write_splits(spark, spec, splits, staging, num_shards=num_shards,
                                          chunk_rows=chunk_rows, row_group_bytes=row_group_bytes, clock=clock)
            for split in splits:
                records.extend(split.done())
            records.sort(key=lambda r: (SPLITS.index(r["split"]) if r["split"] in SPLITS else -1, r["kind"]))
            check_hashes(spec, records, strict=strict)
            manifest = build_manifest(spec, source_dir, records, splits, rows_per_shard)
            files.write_text(staging.join(contract.MANIFEST_NAME), json.dumps(manifest, indent=2) + "\n")
            clock.timed("commit", commit)(staging, out)
        finally:
            files.delete(staging)
    seconds = clock.close()
    if stages is not None:
        stages.update(seconds)
    log.info("ingested %s into %s in %.2fs (%s)", spec.name, out.uri, sum(seconds.values()),
             ", ".join(f"{name} {t:.2f}s" for name, t in seconds.items()))
    return manifest
