"""Fetch a dataset's four gz IDX files into a directory, verified, reusing what this machine already has; a side
tool, run where the files are wanted, no Spark.  See docs/concepts/inputs.md.

For each file of the dataset (:mod:`spark_mnist.datasets`), in order:

1. a copy already under the target name is kept if it verifies; one that does not (an HTML error page saved as
   ``.gz``, a truncated file) is deleted with a warning and fetched again;
2. local copies: ``/usr/share/datasets/<dataset>/`` (Debian's ``fashion-mnist`` package), torchvision roots
   (``<root>/<folder>/raw/<file>.gz`` or the un-gzipped ``<file>``, the folder being the registry's
   ``torchvision_folder``: MNIST, FashionMNIST, KMNIST, EMNIST) and, where the registry names a ``keras_file``
   (``mnist``), Keras' ``~/.keras/datasets/mnist.npz`` (:mod:`spark_mnist.formats.keras_npz`);
3. the dataset's mirrors in order, each tried ``retries`` times with exponential back-off, resuming a partial
   download with an HTTP ``Range`` request (RFC 9110 section 14) from ``<name>.part``.

Every candidate is verified with :func:`spark_mnist.tools.verify.verify_file` (IDX structure, published payload sha256
where known, image shape, label range, published row count) before it appears under its final name, which happens
by ``os.replace`` (:func:`spark_mnist.fs.replacing`): a failed or interrupted run never leaves a half-written file
under a final name.  Why not pooch: docs/development.md.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import requests
import urllib3
from tqdm import tqdm

from spark_mnist import __version__
from spark_mnist.datasets import IMAGES, LABELS, SPLITS, DatasetFile, DatasetSpec, get_dataset
from spark_mnist.errors import ChecksumMismatchError, IdxFormatError, InputError, SourceError, invalid
from spark_mnist.formats.idx import GZIP_MAGIC
from spark_mnist.formats.keras_npz import npz_to_idx_dir
from spark_mnist.fs import replacing
from spark_mnist.paths import normalize_uri, require_local
from spark_mnist.tools.verify import verify_file

__all__ = ["LocalRoots", "download"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16
_BAR = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "disable": None, "leave": False}  # tqdm's, per file
# Statuses worth asking the same mirror again (RFC 9110 section 15, RFC 6585, RFC 8470): timeouts, rate limits, server
# errors.  Any other 4xx (403 Forbidden, 404 Not Found, ...) moves on to the next mirror at once.
RETRYABLE_STATUS = frozenset({408, 425, 429})
NETWORK_ERRORS = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)


@dataclass(frozen=True)
class LocalRoots:
    """Where :func:`download` looks for copies already on this machine before using the network.

    ``datasets``: directories holding ``<dataset name>/<file>`` (Debian installs Fashion-MNIST under
    ``/usr/share/datasets/fashion-mnist``); ``torchvision``: torchvision dataset roots (the ``root`` argument of
    ``torchvision.datasets.MNIST`` and friends, files under ``<root>/<DatasetSpec.torchvision_folder>/raw/``);
    ``keras``: directories holding Keras' npz (``DatasetSpec.keras_file``: ``mnist.npz``).  ``LocalRoots()`` looks
    nowhere; :meth:`default` gives the usual places.
    """

    datasets: Sequence[Path] = ()
    torchvision: Sequence[Path] = ()
    keras: Sequence[Path] = ()

    def __post_init__(self) -> None:
        for field_name in ("datasets", "torchvision", "keras"):
            paths = tuple(Path(p).expanduser() for p in getattr(self, field_name))
            object.__setattr__(self, field_name, paths)

    @classmethod
    def default(cls) -> "LocalRoots":
        """``/usr/share/datasets``; torchvision roots ``./data`` and ``~/data`` (the ``root="data"`` of
        torchvision's tutorials); ``$KERAS_HOME/datasets`` (default ``~/.keras/datasets``)."""
        keras_home = Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser()
        return cls(
            datasets=(Path("/usr/share/datasets"),),
            torchvision=(Path("data"), Path("~/data")),
            keras=(keras_home / "datasets",),
        )


class _Failure(Exception):
    """One failed attempt: ``message`` for the final report; ``retryable`` whether the same mirror may help."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


def download(
    dataset: str | DatasetSpec,
    to: str | os.PathLike,
    *,
    mirrors: Iterable[str] | None = None,
    retries: int = 3,
    backoff: float = 0.5,
    timeout: float = 30,
    local_roots: LocalRoots | None = None,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Path]:
    """Make ``to`` hold the four verified gz IDX files of ``dataset``, fetching only what is missing.

    Args:
        dataset: a registry name (``mnist``, ``fashion-mnist``, ``kmnist``, ``emnist-<split>``) or a
            :class:`~spark_mnist.datasets.DatasetSpec` (file names, published payload sha256s, mirrors).
        to: the target directory: local, ``file:/``, ``/dbfs/`` (``dbfs:/`` on Databricks) or ``/Volumes/``;
            created where missing.  On DBFS and volumes, which do not support appending, partial downloads are
            staged on local disk (the system temporary directory) and copied in once verified.
        mirrors: base URLs tried in order, each followed by the file name; default ``spec.mirrors``.
        retries: attempts per mirror and file (at least 1).
        backoff: seconds; after failed attempt ``k`` (0-based) of a mirror, wait ``backoff * 2**k`` before the next.
        timeout: seconds to connect and, separately, seconds without receiving data (``requests``' timeout).
        local_roots: where to look for copies already on this machine; default :meth:`LocalRoots.default`;
            ``LocalRoots()`` to go straight to the network.
        session: a ``requests.Session`` to use (not closed here); default a new one, closed on return.
        sleep: how to wait between attempts (tests pass a stub).

    Returns:
        ``{file name: path}`` for the four files, in the registry's order (train images, train labels, test images,
        test labels).

    Raises:
        SourceError: a file no local copy or mirror could provide: the message names the file, each URL tried and
            its last error (``403 Forbidden``, ``connection dropped after ...``, ``not IDX: ... HTML page ...``,
            ``sha256 mismatch ...``); or a target that is not a local path.
        InputError: an unknown dataset name.
        ValueError: ``retries`` below 1 or a negative ``backoff``.
    """
    spec = dataset if isinstance(dataset, DatasetSpec) else get_dataset(dataset)
    if retries < 1:
        raise invalid("retries", retries, "at least 1")
    if backoff < 0:
        raise invalid("backoff", backoff, "0 or more seconds")
    mirrors = tuple(spec.mirrors if mirrors is None else mirrors)
    roots = LocalRoots.default() if local_roots is None else local_roots
    target, staging = _target_dirs(to)
    wanted = [(split, kind, spec.file(split, kind)) for split in SPLITS for kind in (IMAGES, LABELS)]
    with contextlib.ExitStack() as stack:
        local, fetch = _LocalCopies(spec, roots, stack), None  # the network only for a file no local copy has
        for split, kind, entry in wanted:
            final = target / entry.name
            if _keep_cached(spec, split, kind, final) or local.install(split, kind, entry, final):
                continue
            if fetch is None:
                http = session if session is not None else stack.enter_context(requests.Session())
                fetch = _Fetch(http, staging, mirrors, retries, backoff, timeout, sleep)
            fetch(spec, split, kind, entry, final)
    return {entry.name: target / entry.name for _, _, entry in wanted}


def _target_dirs(to: str | os.PathLike) -> tuple[Path, Path]:
    """The target directory (created) and where ``.part`` files go: the target itself on local disk, a directory
    under the system temporary directory for DBFS and volumes (their FUSE mounts do not support appending)."""
    require_local(to, "download")
    location = normalize_uri(to)
    if location.os_path is None:
        raise SourceError(f"{location.local_path}: no {location.kind} mount on this machine (not on Databricks?)")
    target = Path(location.os_path)
    target.mkdir(parents=True, exist_ok=True)
    if location.kind == "local":
        return target, target
    digest = hashlib.sha256(str(target).encode(), usedforsecurity=False).hexdigest()[:16]
    staging = Path(tempfile.gettempdir()) / "spark-mnist-download" / digest
    staging.mkdir(parents=True, exist_ok=True)
    return target, staging


def _keep_cached(spec: DatasetSpec, split: str, kind: str, final: Path) -> bool:
    if not final.exists():
        return False
    try:
        verify_file(spec, split, kind, final)
    except InputError as e:
        log.warning("%s: existing file fails verification (%s); fetching it again", final, _describe(e, str(final)))
        final.unlink()
        return False
    log.info("%s: already present and verified", final)
    return True


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _install(source: Path, final: Path, *, move: bool = False) -> None:
    """Put the verified ``source`` under ``final`` atomically, gzip-compressing a plain IDX file."""
    if move and final.parent == source.parent and _is_gzip(source):
        os.replace(source, final)
        return
    compress = not _is_gzip(source)
    with replacing(final) as tmp, open(source, "rb") as src, open(tmp, "wb") as out:
        if compress:
            with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as gz:
                shutil.copyfileobj(src, gz, CHUNK_BYTES)
        else:
            shutil.copyfileobj(src, out, CHUNK_BYTES)
    if move:
        source.unlink(missing_ok=True)


class _LocalCopies:
    """Copies of the dataset already on this machine; Keras' npz is converted at most once per download."""

    def __init__(self, spec: DatasetSpec, roots: LocalRoots, stack: contextlib.ExitStack) -> None:
        self.spec = spec
        self.roots = roots
        self.stack = stack
        self._keras_dirs: list[Path] | None = None

    def _plain_candidates(self, name: str) -> Iterator[Path]:
        stem = name[:-3] if name.endswith(".gz") else name
        dirs = [root / self.spec.name for root in self.roots.datasets]
        if self.spec.torchvision_folder is not None:
            dirs += [root / self.spec.torchvision_folder / "raw" for root in self.roots.torchvision]
        for directory in dirs:
            for candidate in (directory / name, directory / stem):
                if candidate.is_file():
                    yield candidate

    def _keras_candidates(self, name: str) -> Iterator[Path]:
        if self.spec.keras_file is None:
            return
        if self._keras_dirs is None:
            self._keras_dirs = []
            for root in self.roots.keras:
                npz = root / self.spec.keras_file
                if not npz.is_file():
                    continue
                scratch = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="spark-mnist-keras-")))
                try:
                    self._keras_dirs.append(npz_to_idx_dir(npz, scratch, spec=self.spec))
                    log.info("%s: converted Keras' MNIST arrays to IDX files", npz)
                except InputError as e:
                    log.warning("ignoring %s: %s", npz, e)
        for directory in self._keras_dirs:
            yield directory / name

    def install(self, split: str, kind: str, entry: DatasetFile, final: Path) -> bool:
        """Install the first local copy of ``entry`` that verifies under ``final``; whether one did."""
        for candidate in (*self._plain_candidates(entry.name), *self._keras_candidates(entry.name)):
            try:
                verify_file(self.spec, split, kind, candidate)
            except InputError as e:
                log.warning("ignoring local copy %s: %s", candidate, _describe(e, str(candidate)))
                continue
            _install(candidate, final)
            log.info("%s: copied from local copy %s (verified)", final, candidate)
            return True
        return False


def _describe(error: Exception, name: str) -> str:
    """A one-line reason for a failed verification, without the file name prefix."""
    message = str(error).removeprefix(f"{name}: ")
    if isinstance(error, IdxFormatError):
        return f"not IDX: {message}"
    if isinstance(error, ChecksumMismatchError):
        return f"sha256 mismatch: {message}"
    return message


@dataclass(frozen=True)
class _Fetch:
    """Downloads over ``http`` into ``.part`` files under ``staging``, with :func:`download`'s mirrors and retries."""

    http: requests.Session
    staging: Path
    mirrors: Sequence[str]
    retries: int
    backoff: float
    timeout: float
    sleep: Callable[[float], None]

    def __call__(self, spec: DatasetSpec, split: str, kind: str, entry: DatasetFile, final: Path) -> None:
        """Download ``entry`` from the first mirror that yields a verified file and install it under ``final``."""
        part = self.staging / f"{entry.name}.part"
        tried: list[str] = []
        for mirror in self.mirrors:
            url = mirror.rstrip("/") + "/" + entry.name
            last = "not tried"
            attempts = 0
            for attempt in range(self.retries):
                if attempt:
                    delay = self.backoff * 2 ** (attempt - 1)
                    log.info("%s: attempt %d of %d in %.2f s", url, attempt + 1, self.retries, delay)
                    self.sleep(delay)
                attempts += 1
                try:
                    resumed = _get_to_part(self.http, url, part, self.timeout, entry.name)
                except _Failure as failure:
                    last = failure.message
                    log.warning("%s: %s", url, failure.message)
                    if failure.retryable:
                        continue
                    break
                try:
                    verify_file(spec, split, kind, part, name=url)
                except InputError as e:
                    part.unlink(missing_ok=True)
                    last = _describe(e, url)
                    log.warning("%s: downloaded file fails verification, deleted: %s", url, last)
                    if resumed:  # the kept prefix may be what was wrong: start again from byte 0
                        continue
                    break
                _install(part, final, move=True)
                log.info("%s: downloaded from %s (verified)", final, url)
                return
            tried.append(f"{url}: {last} ({attempts} attempt{'s' if attempts != 1 else ''})")
        if not tried:
            raise SourceError(f"{entry.name}: no local copy verified and no mirror to download {spec.name} from")
        raise SourceError(f"{entry.name}: could not download a verified copy from any mirror: " + "; ".join(tried))


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``(first byte, total length)`` of a ``Content-Range: bytes first-last/total`` header (``None`` if absent)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[len("bytes ") :].partition("/")
    first = span.partition("-")[0]
    try:
        return int(first), (int(total) if total.strip().isdigit() else None)
    except ValueError:
        return None, None


def _get_to_part(http: requests.Session, url: str, part: Path, timeout: float, name: str) -> bool:
    """One GET of ``url`` into ``part``, resuming from its current size with a ``Range`` request.

    Returns whether the bytes now in ``part`` include some from an earlier attempt.  Raises :class:`_Failure` for an
    HTTP error status, a failed connection, or a body cut short (the part is kept for the next attempt).
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {
        "Accept-Encoding": "identity",
        "User-Agent": f"spark-mnist/{__version__} {requests.utils.default_user_agent()}",
    }
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = http.get(url, headers=headers, stream=True, timeout=timeout)
    except NETWORK_ERRORS as e:
        raise _Failure(f"connection failed: {e}", retryable=True) from e
    with response:
        status = response.status_code
        if status == 416 and offset:  # nothing after ``offset``: the part may be complete already
            log.info("%s: range from byte %d not satisfiable; checking the %d bytes already here", url, offset, offset)
            return True
        if status not in (200, 206):
            retryable = status in RETRYABLE_STATUS or status >= 500
            raise _Failure(f"{status} {response.reason}".strip(), retryable=retryable)
        first, total = _content_range(response.headers.get("Content-Range"))
        if status == 206 and (not offset or first != offset):
            part.unlink(missing_ok=True)
            raise _Failure(f"206 for bytes from {first}, not the {offset} asked for; restarting", retryable=True)
        if status == 200 and offset:
            log.info("%s: server ignored the Range request (200); restarting from byte 0", url)
            offset = 0
        length = response.headers.get("Content-Length")
        end = offset + int(length) if length and length.isdigit() else total
        written = offset
        with open(part, "ab" if offset else "wb") as out, tqdm(total=end, initial=offset, desc=name, **_BAR) as bar:
            try:
                for chunk in response.raw.stream(CHUNK_BYTES, decode_content=False):
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            except NETWORK_ERRORS as e:
                raise _Failure(
                    f"connection dropped after {written} of {end if end is not None else '?'} bytes "
                    f"({type(e).__name__})",
                    retryable=True,
                ) from e
        if end is not None and written < end:
            raise _Failure(f"connection dropped after {written} of {end} bytes", retryable=True)
        return offset > 0
