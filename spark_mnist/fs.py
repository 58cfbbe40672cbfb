"""The driver's file operations, with no Spark session: exists, delete, list, mkdirs, rename, small writes; and local
file writes that never leave a half-written file under the final name.

Every operation takes a :class:`~spark_mnist.paths.Location`.  Where :mod:`os` can reach the place
(:attr:`Location.is_local <spark_mnist.paths.Location.is_local>`: local disk, the ``/dbfs`` FUSE mount,
``/Volumes``) it goes through :mod:`os`; everywhere else through :mod:`pyarrow.fs` (``s3://``, ``gs://``,
``hdfs://``, and ``abfss://`` where the installed pyarrow has it), or through fsspec for a scheme pyarrow lacks
(``s3a://`` with s3fs installed, ``memory://``, ...).  ``dbfs:/`` without the FUSE mount (Spark Connect off the
cluster) is refused: use ``/Volumes/...`` or the ``/dbfs/...`` path on a machine that has the mount.

Atomicity of :func:`rename`, which the commit of an ingest relies on (readers see the previous dataset or the new
one, never a mix): exact on POSIX, on the ``/dbfs`` and ``/Volumes`` FUSE mounts (``os.rename``) and on HDFS (one
namenode rename).  On object stores a "rename" is a copy of every object then a delete (pyarrow's ``move`` is
copy+delete for one object and refuses directories on S3 and GCS, so :func:`rename` copies the tree itself;
fsspec's ``mv`` does the same): a reader listing ``OUT`` during the commit there can see a partly copied dataset,
and a crash in between leaves both copies.

:func:`replacing` is the one "write to a temporary name beside the target, then ``os.replace``" of the package:
IDX files, checkpoints, models, pictures, downloads and the manifest all go through it.  ``os.replace`` is atomic on
POSIX (and on the ``/dbfs`` and ``/Volumes`` FUSE mounts, within one directory).

No Spark here; pyarrow and fsspec are imported only when a non-local place is used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from urllib.parse import urlparse

from spark_mnist.errors import SourceError

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem

    from spark_mnist.paths import Location


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path`` in one rename, on any
    error it is removed and ``path`` is left as it was.

    Example::

        with replacing("run/model.pt") as tmp:
            torch.save(state, tmp)
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def filesystem(location: "Location") -> "tuple[FileSystem, str]":
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
    from pyarrow import fs as pafs

    if location.is_local:
        return pafs.LocalFileSystem(), location.local_path
    if location.kind == "dbfs":
        raise SourceError(f"{location.uri}: dbfs:/ paths need the /dbfs FUSE mount, which this machine does not have "
                          f"(Spark Connect off the cluster?); use a /Volumes/<catalog>/<schema>/<volume>/... path, or "
                          f"run where /dbfs{location.uri[len('dbfs:'):]} exists")
    if location.kind == "volume":
        raise SourceError(f"{location.uri}: /Volumes paths need the /Volumes FUSE mount, which this machine does "
                          f"not have; run on a Databricks cluster, or use an s3://, gs://, abfss:// or hdfs:// URI")
    uri = location.uri
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, NotImplementedError) as e:  # pyarrow's ArrowInvalid / ArrowNotImplementedError
        pyarrow_error = e
    return _fsspec_filesystem(uri, pyarrow_error)


def _fsspec_filesystem(uri: str, pyarrow_error: Exception) -> "tuple[FileSystem, str]":
    """fsspec's file system for ``uri`` (a scheme pyarrow refused with ``pyarrow_error``), wrapped for pyarrow."""
    import pyarrow
    from pyarrow import fs as pafs

    scheme = urlparse(uri).scheme
    supported = (f"local paths, /dbfs/..., /Volumes/... and the URIs pyarrow {pyarrow.__version__} opens (s3://, "
                 f"gs://, hdfs://{', abfss://' if _pyarrow_has_azure() else ''}) or fsspec does")
    try:
        import fsspec
    except ImportError:
        package = {"s3a": "s3fs", "s3n": "s3fs", "gcs": "gcsfs", "abfs": "adlfs", "abfss": "adlfs", "az": "adlfs",
                   "adl": "adlfs", "wasbs": "adlfs"}.get(scheme, f"the fsspec package for {scheme}://")
        raise SourceError(f"{uri}: pyarrow {pyarrow.__version__} has no file system for {scheme}:// "
                          f"({pyarrow_error}) and fsspec is not installed; pip install fsspec {package}") from None
    try:
        filesystem, path = fsspec.core.url_to_fs(uri)
    except ImportError as e:  # fsspec knows the scheme; its package is missing (the message names it)
        raise SourceError(f"{uri}: pyarrow {pyarrow.__version__} has no file system for {scheme}://, and "
                          f"fsspec's for it needs a package that is not installed: {e}") from None
    except ValueError:  # "Protocol not known"
        raise SourceError(f"{uri}: no file system for {scheme}:// here; supported are {supported}") from None
    protocols = filesystem.protocol if isinstance(filesystem.protocol, (tuple, list)) else (filesystem.protocol,)
    if scheme not in protocols:  # e.g. "foo:/x" read as a local relative path
        raise SourceError(f"{uri}: no file system for {scheme}:// here; supported are {supported}")
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path


def _pyarrow_has_azure() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyarrow._azurefs") is not None


def exists(location: "Location") -> bool:
    """Whether anything (file or directory) exists at ``location``.

    Raises:
        SourceError: a place no file system here can reach (:func:`filesystem`).
        OSError: the file system failed.
    """
    if location.is_local:
        return os.path.exists(location.local_path)
    from pyarrow.fs import FileType

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != FileType.NotFound


def delete(location: "Location") -> None:
    """Remove ``location`` recursively; nothing happens where nothing exists.

    Raises:
        SourceError: a place no file system here can reach (:func:`filesystem`).
        OSError: the file system failed (on local paths, only a file that could not be removed: a directory tree
            is removed with errors ignored).
    """
    if location.is_local:
        if os.path.isdir(location.local_path):
            shutil.rmtree(location.local_path, ignore_errors=True)
        elif os.path.lexists(location.local_path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(location.local_path)
        return
    from pyarrow.fs import FileType

    fs, path = filesystem(location)
    kind = fs.get_file_info(path).type
    with contextlib.suppress(FileNotFoundError):  # removed meanwhile by someone else
        if kind == FileType.Directory:
            fs.delete_dir(path)
        elif kind != FileType.NotFound:
            fs.delete_file(path)


def list_names(location: "Location") -> list[str]:
    """Names of the entries directly in the directory ``location`` (files and directories, hidden ones included),
    sorted; empty where nothing exists there.

    Raises:
        SourceError: a place no file system here can reach (:func:`filesystem`).
        OSError: the file system failed (e.g. a directory that cannot be read).
    """
    if location.is_local:
        return sorted(os.listdir(location.local_path)) if os.path.isdir(location.local_path) else []
    from pyarrow.fs import FileSelector, FileType

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != FileType.Directory:
        return []
    return sorted(info.base_name for info in fs.get_file_info(FileSelector(path, allow_not_found=True)))


def makedirs(location: "Location") -> None:
    """Create the directory ``location`` and its parents; nothing happens where it exists.

    Raises:
        SourceError: a place no file system here can reach (:func:`filesystem`).
        OSError: the directory could not be created (e.g. a file is in the way).
    """
    if location.is_local:
        os.makedirs(location.local_path, exist_ok=True)
        return
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)


def rename(src: "Location", dst: "Location") -> None:
    """Rename ``src`` to ``dst`` (both on one file system); ``dst`` must not exist.

    Atomic on local paths, the FUSE mounts and HDFS; a copy then a delete on object stores (module docstring).

    Raises:
        FileExistsError: ``dst`` exists (on local paths: a non-empty directory or a file).
        FileNotFoundError: ``src`` does not exist.
        SourceError: a place no file system here can reach (:func:`filesystem`).
        OSError: the rename failed.
    """
    if src.is_local:
        try:
            os.rename(src.local_path, dst.local_path)
        except OSError as e:
            if not isinstance(e, FileNotFoundError) and os.path.exists(dst.local_path):
                raise FileExistsError(dst.local_path) from e
            raise
        return
    from pyarrow.fs import FileType

    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    kind = fs.get_file_info(src_path).type
    if kind == FileType.NotFound:
        raise FileNotFoundError(src.uri)
    if fs.get_file_info(dst_path).type != FileType.NotFound:
        raise FileExistsError(dst.uri)
    if kind == FileType.Directory and fs.type_name in ("s3", "gcs"):  # pyarrow moves single objects only there
        _copy_tree(fs, src_path, dst_path)
        fs.delete_dir(src_path)
    else:
        fs.move(src_path, dst_path)


def _copy_tree(fs: "FileSystem", src: str, dst: str) -> None:
    from pyarrow.fs import FileSelector, FileType

    fs.create_dir(dst, recursive=True)
    for info in fs.get_file_info(FileSelector(src, recursive=True)):
        target = dst + info.path[len(src):]
        if info.type == FileType.Directory:
            fs.create_dir(target, recursive=True)
        elif info.type == FileType.File:
            fs.copy_file(info.path, target)


def read_bytes(location: "Location") -> bytes:
    """The whole content of the file ``location``.

    Raises:
        FileNotFoundError: nothing there.
        SourceError: as :func:`filesystem`.
    """
    if location.is_local:
        return Path(location.local_path).read_bytes()
    filesystem_, path = filesystem(location)
    with filesystem_.open_input_stream(path) as stream:
        return stream.read()


def write_text(location: "Location", text: str) -> None:
    """Write ``text`` (UTF-8) to the file ``location``, replacing it; a local file is never seen half-written
    (:func:`replacing`), an object is written in one upload.

    Raises:
        SourceError: a place no file system here can reach (:func:`filesystem`).
        OSError: the file could not be written (e.g. its directory is missing).
    """
    data = text.encode("utf-8")
    if location.is_local:
        with replacing(location.local_path) as tmp:
            tmp.write_bytes(data)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as stream:
        stream.write(data)
