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

import contextlib
import gzip
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import requests
import urllib3
from tqdm import tqdm

from spark_mnist import __version__
from spark_mnist.datasets import IMAGES, LABELS, SPLITS, DatasetSpec, get_dataset
from spark_mnist.errors import ChecksumMismatchError, IdxFormatError, InputError, SourceError, invalid
from spark_mnist.formats.idx import GZIP_MAGIC
from spark_mnist.formats.keras_npz import npz_to_idx_dir
from spark_mnist.fs import filesystem, replacing
from spark_mnist.paths import normalize_uri, require_local
from spark_mnist.tools.verify import verify_file

__all__ = ["LocalRoots", "download"]

log = logging.getLogger(__name__)

_BAR = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "disable": None, "leave": False}  # tqdm's, per file
USER_AGENT = f"spark-mnist/{__version__} {requests.utils.default_user_agent()}"
# Statuses worth asking the same mirror again (RFC 9110 section 15, RFC 6585, RFC 8470): timeouts, rate limits, server
# errors.  Any other 4xx (403 Forbidden, 404 Not Found, ...) moves on to the next mirror at once.
RETRYABLE_STATUS = frozenset({408, 425, 429, *range(500, 600)})
# requests wraps what its GET raises, and urllib3 what reading the body raises (socket errors, timeouts, http.client's
# IncompleteRead), in exceptions of their own.
NETWORK_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError)
# How a failed verification's one-line reason starts, by the error's class.
_REASON = {IdxFormatError: "not IDX: ", ChecksumMismatchError: "sha256 mismatch: "}


@dataclass(frozen=True)
class LocalRoots:
    """Where :func:`download` looks for copies already on this machine before using the network.

    ``datasets``: directories holding ``<dataset name>/<file>`` (Debian installs Fashion-MNIST under
    ``/usr/share/datasets/fashion-mnist``); ``torchvision``: torchvision dataset roots (the ``root`` argument of
    ``torchvision.datasets.MNIST`` and friends, files under ``<root>/<DatasetSpec.torchvision_folder>/raw/``);
    ``keras``: directories holding Keras' npz (``DatasetSpec.keras_file``: ``mnist.npz``).  ``LocalRoots()`` looks
    nowhere; :meth:`default` gives the usual places.
    """

    datasets: Sequence[str | os.PathLike] = ()
    torchvision: Sequence[str | os.PathLike] = ()
    keras: Sequence[str | os.PathLike] = ()

    @classmethod
    def default(cls) -> "LocalRoots":
        """``/usr/share/datasets``; torchvision roots ``./data`` and ``~/data`` (the ``root="data"`` of
        torchvision's tutorials); ``$KERAS_HOME/datasets`` (default ``~/.keras/datasets``)."""
        keras_home = os.environ.get("KERAS_HOME") or "~/.keras"
        return cls(("/usr/share/datasets",), ("data", "~/data"), (Path(keras_home, "datasets"),))


class _Failure(Exception):
    """A failed attempt after which the next mirror is tried; its message is for the final report."""


class _Retryable(_Failure):
    """A failed attempt that the same mirror may get right (a dropped connection, a 503)."""


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
    target, staging = _target_dirs(to)

    def fetch(split: str, kind: str, final: Path, http: requests.Session) -> None:
        """Download ``final``'s file from the first mirror that yields a verified copy, through a ``.part`` file in
        ``staging``, and install it under ``final``."""
        part, tried = staging / f"{final.name}.part", []
        for url in (mirror.rstrip("/") + "/" + final.name for mirror in mirrors):
            for attempt in range(retries):
                if attempt:
                    delay = backoff * 2 ** (attempt - 1)
                    log.info("%s: attempt %d of %d in %.2f s", url, attempt + 1, retries, delay)
                    sleep(delay)
                try:
                    resumed = _get_to_part(http, url, part, timeout)
                    try:
                        verify_file(spec, split, kind, part, name=url)
                    except InputError as e:
                        part.unlink(missing_ok=True)  # a resumed part's kept prefix may be what was wrong: from byte 0
                        raise (_Retryable if resumed else _Failure)(_reason(e, url)) from e
                except _Failure as failure:
                    log.warning("%s: %s", url, last := str(failure))
                    if isinstance(failure, _Retryable):
                        continue
                    break
                _install(part, final)
                part.unlink()
                log.info("%s: downloaded from %s (verified)", final, url)
                return
            tried.append(f"{url}: {last} ({attempt + 1} attempt{'s' if attempt else ''})")
        if not tried:
            raise SourceError(f"{final.name}: no local copy verified and no mirror to download {spec.name} from")
        raise SourceError(f"{final.name}: could not download a verified copy from any mirror: " + "; ".join(tried))

    roots = LocalRoots.default() if local_roots is None else local_roots
    dirs = [Path(root).expanduser() / spec.name for root in roots.datasets]
    if spec.torchvision_folder is not None:
        dirs += [Path(root).expanduser() / spec.torchvision_folder / "raw" for root in roots.torchvision]
    wanted = [(split, kind, target / spec.file(split, kind).name) for split in SPLITS for kind in (IMAGES, LABELS)]
    keras_dirs: list[Path] | None = None  # Keras' npz is converted at most once, and only for a file still missing
    with contextlib.ExitStack() as stack:
        http = session if session is not None else stack.enter_context(requests.Session())
        for split, kind, final in wanted:
            names = (final.name, final.name.removesuffix(".gz"))  # torchvision keeps the extracted file too
            if _install_local(spec, split, kind, final, [final, *(d / name for d in dirs for name in names)]):
                continue
            keras_dirs = _keras_dirs(spec, roots, stack) if keras_dirs is None else keras_dirs
            if not _install_local(spec, split, kind, final, [d / final.name for d in keras_dirs]):
                fetch(split, kind, final, http)
    return {final.name: final for _, _, final in wanted}


def _target_dirs(to: str | os.PathLike) -> tuple[Path, Path]:
    """The target directory (created) and where ``.part`` files go: the target itself on local disk, a directory
    under the system temporary directory for DBFS and volumes (their FUSE mounts do not support appending), the
    target's own path below ``spark-mnist-download/`` (so a later run resumes there)."""
    location = normalize_uri(require_local(to, "download"))
    target = Path(filesystem(location)[1])  # refuses dbfs:/ and /Volumes without their FUSE mount here
    staging = target if location.kind == "local" else Path(tempfile.gettempdir(), f"spark-mnist-download{target}")
    for directory in (target, staging):
        directory.mkdir(parents=True, exist_ok=True)
    return target, staging


def _keras_dirs(spec: DatasetSpec, roots: LocalRoots, stack: contextlib.ExitStack) -> list[Path]:
    """The IDX files of ``spec``'s Keras npz under ``roots.keras``, converted into temporary directories that
    ``stack`` removes; an npz that cannot be converted is ignored with a warning."""
    converted = []
    for npz in filter(Path.is_file, (Path(r).expanduser() / spec.keras_file for r in roots.keras if spec.keras_file)):
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="spark-mnist-keras-")))
        try:
            converted.append(npz_to_idx_dir(npz, scratch, spec=spec))
            log.info("%s: converted Keras' MNIST arrays to IDX files", npz)
        except InputError as e:
            log.warning("ignoring %s: %s", npz, e)
    return converted


def _install_local(spec: DatasetSpec, split: str, kind: str, final: Path, candidates: Iterable[Path]) -> bool:
    """Install under ``final`` the first of ``candidates`` that is a file and verifies (``final`` itself stays where
    it is one; where it fails verification, it is deleted); whether one did."""
    for candidate in filter(Path.is_file, candidates):
        try:
            verify_file(spec, split, kind, candidate)
        except InputError as e:
            log.warning("ignoring local copy %s: fails verification (%s)", candidate, _reason(e, str(candidate)))
            if candidate == final:
                final.unlink()
            continue
        if candidate != final:
            _install(candidate, final)
        log.info("%s: verified, from %s", final, candidate)
        return True
    return False


def _install(source: Path, final: Path) -> None:
    """Copy the verified ``source`` to ``final`` atomically, gzip-compressing a plain IDX file."""
    with open(source, "rb") as src, replacing(final) as tmp:
        gzipped = src.read(2) == GZIP_MAGIC
        src.seek(0)
        with open(tmp, "wb") if gzipped else gzip.GzipFile(tmp, "wb", compresslevel=6, mtime=0) as out:
            shutil.copyfileobj(src, out)


def _reason(error: InputError, name: str) -> str:
    """A one-line reason for a failed verification, without the file name prefix."""
    return _REASON.get(type(error), "") + str(error).removeprefix(f"{name}: ")


def _get_to_part(http: requests.Session, url: str, part: Path, timeout: float) -> bool:
    """One GET of ``url`` into ``part``, resuming from its current size with a ``Range`` request.

    Returns whether the bytes now in ``part`` include some from an earlier attempt.  Raises :class:`_Retryable` for a
    failed connection, a retryable status or a body cut short (the part is kept for the next attempt);
    :class:`_Failure` for another HTTP error status.
    """
    offset = part.stat().st_size if part.exists() else 0
    ranged = {"Range": f"bytes={offset}-"} if offset else {}  # resume after the bytes already in ``part``
    headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT, **ranged}
    try:
        response = http.get(url, headers=headers, stream=True, timeout=timeout)
    except NETWORK_ERRORS as e:
        raise _Retryable(f"connection failed: {e}") from e
    with response:
        status = response.status_code
        if status == 416 and offset:  # nothing after ``offset``: the part may be complete already
            log.info("%s: range from byte %d not satisfiable; checking the %d bytes already here", url, offset, offset)
            return True
        if status not in (200, 206):
            raise (_Retryable if status in RETRYABLE_STATUS else _Failure)(f"{status} {response.reason}".strip())
        if status == 200 and offset:
            log.info("%s: server ignored the Range request (200); restarting from byte 0", url)
            offset = 0  # the part is opened with "wb" below: written again from byte 0
        end = offset + int(length) if (length := response.headers.get("Content-Length", "")).isdigit() else None
        with part.open("ab" if offset else "wb") as out, tqdm(total=end, initial=offset, desc=part.stem, **_BAR) as bar:
            try:
                for chunk in response.raw.stream(decode_content=False):  # 64 KiB at a time (urllib3's default)
                    bar.update(out.write(chunk))
            except NETWORK_ERRORS as e:
                dropped = f"connection dropped after {out.tell()} of {end or '?'} bytes"
                raise _Retryable(f"{dropped} ({type(e).__name__})") from e
            if end is not None and out.tell() < end:
                raise _Retryable(f"connection dropped after {out.tell()} of {end} bytes")
        return offset > 0
