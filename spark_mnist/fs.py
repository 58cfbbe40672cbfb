"""File operations with no Spark session, anywhere (driver, Spark tasks, ranks, tools): exists, delete, list,
small writes, the one URI -> file system resolver; and writes that never leave a half-written file under the final
name.

Every operation takes a :class:`~spark_mnist.paths.Location`.  Where :mod:`os` can reach the place
(:attr:`Location.os_path <spark_mnist.paths.Location.os_path>`: local disk, the ``/dbfs`` FUSE mount,
``/Volumes``) it goes through pyarrow's ``LocalFileSystem`` (:mod:`shutil` for directory deletes, :func:`replacing`);
everywhere else through :mod:`pyarrow.fs` (``s3://``, ``gs://``,
``hdfs://``, and ``abfss://`` where the installed pyarrow has it), or through fsspec for a scheme pyarrow lacks
(``s3a://`` with s3fs installed, ``memory://``, ...).  ``dbfs:/`` without the FUSE mount (Spark Connect off the
cluster) is refused: use ``/Volumes/...`` or the ``/dbfs/...`` path on a machine that has the mount.

No directory is ever renamed here: a dataset is committed by writing its manifest last, in one single-object write
(:func:`write_whole`, :mod:`spark_mnist.shards.commit`; why: docs/concepts/dataset.md).

Endpoints and credentials of object stores come from the standard variables (which the ``storage`` settings set,
:class:`spark_mnist.config.StorageSettings`) or from the URI (:func:`filesystem`; :func:`task_uri` writes the
driver's S3 endpoint into the URI Spark's tasks get); ``AWS_ENDPOINT_URL`` applies on every pyarrow.  Which
variables and URI options each store takes: docs/how-to/object-stores.md.

:func:`replacing` is the one "write to a temporary name beside the target, then ``os.replace``" of the package:
IDX files, checkpoints, models, pictures, downloads and the manifest all go through it.  ``os.replace`` is atomic on
POSIX (and on the ``/dbfs`` and ``/Volumes`` FUSE mounts, within one directory).

No Spark here; fsspec is imported only for a scheme pyarrow lacks.
"""

import contextlib
import errno
import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from urllib.parse import parse_qsl, urlencode, urlparse, urlsplit, urlunsplit

from spark_mnist.errors import SourceError
from spark_mnist.paths import Location, redact

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem

__all__ = ["replacing", "filesystem", "task_uri", "exists", "delete", "list_names", "write_whole"]


# What a mount that cannot rename answers: ENOSYS (a Unity Catalog volume's FUSE mount, delta-io/delta-rs#2540),
# EPERM or ENOTSUP (FUSE layers that refuse it), EXDEV (a rename across what the mount presents as devices).
RENAME_REFUSED = frozenset({errno.ENOSYS, errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP})


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path`` in one rename, on any
    error it is removed and ``path`` is left as it was.

    Where the file system refuses the rename (:data:`RENAME_REFUSED`: a FUSE mount over object storage) the
    content is written to ``path`` whole, in one ``write`` call, and the temporary file removed: such a mount
    uploads the file as one object when it is closed, so readers there still see the old or the new content.

    Example::

        with replacing("run/model.pt") as tmp:
            torch.save(state, tmp)
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError as e:
            if e.errno not in RENAME_REFUSED:
                raise
            _write_in_place(final, tmp.read_bytes())  # a mount without rename: one whole-file write
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a rename


def filesystem(location: Location) -> "tuple[FileSystem, str]":
    """The pyarrow file system that serves ``location`` and the path of ``location`` on it.

    A local place gives pyarrow's ``LocalFileSystem`` and its local path; a URI gives what
    ``pyarrow.fs.FileSystem.from_uri`` returns, or, for a scheme pyarrow has no file system for, fsspec's file
    system for it wrapped in ``pyarrow.fs.PyFileSystem`` (so callers see one API).

    Raises:
        SourceError: ``dbfs:/`` or ``/Volumes`` without their FUSE mount on this machine; a scheme neither pyarrow
            nor fsspec supports; a scheme only fsspec supports while fsspec (or its package for the scheme) is
            missing.  Each message names the URI and what to do.
        OSError: pyarrow could not set up the file system (e.g. ``hdfs://`` without libhdfs, no credentials).
    """
    from pyarrow import fs as pafs  # pyarrow here, not at the top: `import spark_mnist` imports this module (runs)

    if location.os_path is not None:
        return pafs.LocalFileSystem(), location.os_path
    if location.kind == "dbfs":
        raise SourceError(
            f"{redact(location.uri)}: dbfs:/ paths need the /dbfs FUSE mount, which this machine does "
            f"not have (Spark Connect off the cluster?); use a /Volumes/<catalog>/<schema>/<volume>/... "
            f"path, or run where /dbfs{location.uri[len('dbfs:') :]} exists"
        )
    if location.kind == "volume":
        raise SourceError(
            f"{redact(location.uri)}: /Volumes paths need the /Volumes FUSE mount, which this machine does not have; "
            f"run on a Databricks cluster, or use an s3://, gs://, abfss:// or hdfs:// URI"
        )
    uri = task_uri(location)  # a URI here: ``display`` is ``uri``
    if (azure := _azure_filesystem(uri)) is not None:
        return azure
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, NotImplementedError) as e:  # pyarrow's ArrowInvalid / ArrowNotImplementedError
        return _fsspec_filesystem(uri, e)


AZURE_SCHEMES = ("abfs", "abfss", "az")
# The package fsspec needs for a scheme pyarrow may lack, named where fsspec itself is missing.
_FSSPEC_PACKAGES = dict.fromkeys((*AZURE_SCHEMES, "adl", "wasbs"), "adlfs")
_FSSPEC_PACKAGES.update(s3a="s3fs", s3n="s3fs", gcs="gcsfs")


def task_uri(location: Location) -> str:
    """``location`` as Spark's tasks are given it: for ``s3://``, its URI with this process's endpoint
    (``AWS_ENDPOINT_URL``, e.g. from the ``storage.s3_endpoint_url`` setting) written in where it names none, so
    executors that lack the variable (an existing session's, a Spark Connect server's) reach the store the driver
    reaches; else :attr:`Location.display <spark_mnist.paths.Location.display>`.  Credentials are not written in:
    the executors' own chain gives them; :func:`filesystem` resolves a URI with the endpoint so written in.
    ``AWS_ENDPOINT_URL_S3`` is taken before ``AWS_ENDPOINT_URL`` (``http://host:port``); a URI that names its own
    endpoint stays as it is."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    parts = urlsplit(location.display)
    query = dict(parse_qsl(parts.query))
    if parts.scheme != "s3" or not endpoint or "endpoint_override" in query:
        return location.display
    endpoint_parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    query.update(endpoint_override=endpoint_parts.netloc, scheme=endpoint_parts.scheme)
    return urlunsplit(parts._replace(query=urlencode(query)))


# The AzureFileSystem options a URI's query may give (pyarrow's own from_uri refuses them).
AZURE_URI_OPTION = re.compile(r"account_key|(blob|dfs)_storage_(authority|scheme)")


def _azure_filesystem(uri: str) -> "tuple[FileSystem, str] | None":
    """pyarrow's ``AzureFileSystem`` for ``abfss://container@account.dfs.core.windows.net/path``, with the account
    key and endpoints from ``AZURE_STORAGE_CONNECTION_STRING`` (Azurite's form included), else
    ``AZURE_STORAGE_ACCOUNT_KEY``, and from the URI's query (``?account_key=...&blob_storage_authority=host:port
    &dfs_storage_authority=host:port&blob_storage_scheme=http&dfs_storage_scheme=http``, which pyarrow's own
    ``from_uri`` refuses); ``None`` for another scheme, where none of them is given or where this pyarrow has no
    Azure (then ``FileSystem.from_uri``, with Azure's default credential chain, or fsspec's adlfs takes the URI)."""
    parts = urlsplit(uri)
    if parts.scheme not in AZURE_SCHEMES or not _pyarrow_has_azure():
        return None
    container, _, host = parts.netloc.rpartition("@")
    options = {"account_name": host.split(".", 1)[0]}
    if connection := os.environ.get("AZURE_STORAGE_CONNECTION_STRING"):
        fields = dict(item.split("=", 1) for item in connection.split(";") if "=" in item)
        options["account_name"] = fields.get("AccountName", options["account_name"])
        options["account_key"] = fields.get("AccountKey", "")
        if fields.get("BlobEndpoint"):  # an emulator or a custom domain: one host serves blob and dfs
            endpoint = urlsplit(fields["BlobEndpoint"])
            options.update(dict.fromkeys(("blob_storage_authority", "dfs_storage_authority"), endpoint.netloc))
            options.update(dict.fromkeys(("blob_storage_scheme", "dfs_storage_scheme"), endpoint.scheme))
    elif os.environ.get("AZURE_STORAGE_ACCOUNT_KEY"):
        options["account_key"] = os.environ["AZURE_STORAGE_ACCOUNT_KEY"]
    options.update((k, v) for k, v in parse_qsl(parts.query) if AZURE_URI_OPTION.fullmatch(k))
    if len(options) == 1:
        return None
    from pyarrow.fs import AzureFileSystem  # pyarrow >= 16 only (checked above)

    return AzureFileSystem(**options), f"{container}{parts.path}".rstrip("/")


def _fsspec_filesystem(uri: str, pyarrow_error: Exception) -> "tuple[FileSystem, str]":
    """fsspec's file system for ``uri`` (a scheme pyarrow refused with ``pyarrow_error``), wrapped for pyarrow."""
    # pyarrow here, not at the top: `import spark_mnist` imports this module (runs); fsspec: optional, below.
    import pyarrow
    from pyarrow import fs as pafs

    scheme = urlparse(uri).scheme
    lacks = f"{redact(uri)}: pyarrow {pyarrow.__version__} has no file system for {scheme}://"
    try:
        import fsspec  # optional: only for a scheme pyarrow lacks
    except ImportError:
        package = _FSSPEC_PACKAGES.get(scheme, f"the fsspec package for {scheme}://")
        raise SourceError(
            f"{lacks} ({redact(str(pyarrow_error))}) and fsspec is not installed; pip install fsspec {package}"
        ) from None
    try:
        if fsspec.core.split_protocol(uri)[0] == scheme:  # not for "foo:/x", which fsspec reads as a local path
            filesystem, path = fsspec.core.url_to_fs(uri)
            return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path
    except ImportError as e:  # fsspec knows the scheme; its package is missing (the message names it)
        raise SourceError(
            f"{lacks}, and fsspec's for it needs a package that is not installed: {redact(str(e))}"
        ) from None
    except ValueError:  # "Protocol not known"
        pass
    raise SourceError(
        f"{redact(uri)}: no file system for {scheme}:// here; supported are local paths, /dbfs/..., /Volumes/... "
        f"and the URIs pyarrow {pyarrow.__version__} opens (s3://, gs://, hdfs://"
        f"{', abfss://' if _pyarrow_has_azure() else ''}) or fsspec does"
    )


def _pyarrow_has_azure() -> bool:
    return importlib.util.find_spec("pyarrow._azurefs") is not None


def exists(location: Location) -> bool:
    """Whether anything (file or directory) exists at ``location``.

    Raises:
        SourceError: a place no file system here can reach (:func:`filesystem`).
        OSError: the file system failed.
    """
    from pyarrow.fs import FileType  # not at the top: `import spark_mnist` imports this module (runs)

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != FileType.NotFound


def delete(location: Location) -> None:
    """Remove ``location`` recursively; nothing happens where nothing exists.

    Raises:
        SourceError: a place no file system here can reach (:func:`filesystem`).
        OSError: the file system failed (on local paths, only a file that could not be removed: a directory tree
            is removed with errors ignored).
    """
    from pyarrow.fs import FileType  # not at the top: `import spark_mnist` imports this module (runs)

    fs, path = filesystem(location)
    kind = fs.get_file_info(path).type
    with contextlib.suppress(FileNotFoundError):  # removed meanwhile by someone else
        if kind == FileType.Directory and location.os_path is not None:
            shutil.rmtree(path, ignore_errors=True)
        elif kind == FileType.Directory:
            fs.delete_dir(path)
        elif kind != FileType.NotFound:
            fs.delete_file(path)


def list_names(location: Location) -> list[str]:
    """Names of the entries directly in the directory ``location`` (files and directories, hidden ones included),
    sorted; empty where nothing exists there.

    Raises:
        SourceError: a place no file system here can reach (:func:`filesystem`).
        OSError: the file system failed (e.g. a directory that cannot be read).
    """
    from pyarrow.fs import FileSelector  # not at the top: `import spark_mnist` imports this module (runs)

    fs, path = filesystem(location)
    return sorted(info.base_name for info in fs.get_file_info(FileSelector(path, allow_not_found=True)))


def write_whole(location: Location, data: bytes) -> None:
    """Make ``data`` the content of the file ``location`` in one atomic single-object write: what commits a
    dataset (its manifest).  Local disk and FUSE mounts: :func:`replacing`; object stores (``s3://``, ``gs://``,
    ``abfss://``): one output stream, which pyarrow uploads as one PUT when it is closed (an object under 5 MiB is
    never a multipart upload), so a failure before the close leaves the previous object as it was.

    Raises:
        SourceError: a place no file system here can reach (:func:`filesystem`).
        OSError: the file could not be written (e.g. its directory is missing).
    """
    if location.os_path is not None:
        with replacing(location.os_path) as tmp:
            tmp.write_bytes(data)
        return
    fs, path = filesystem(location)
    # No temporary object and rename: an object store's rename is a copy; one PUT is already atomic for readers.
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def _write_in_place(path: Path, data: bytes) -> None:
    """``data`` as the whole content of ``path`` (a mount that cannot rename); the store tests pause here."""
    path.write_bytes(data)
