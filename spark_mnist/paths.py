"""Where datasets live: URI normalisation, pure (no Spark, no I/O but existence checks), anywhere.  Object stores'
URIs: docs/how-to/object-stores.md.

One function, :func:`normalize_uri`, turns every accepted spelling into a :class:`Location`:

=============================  ==========================  ==============================
given                          Spark URI                   path on this machine
=============================  ==========================  ==============================
``dbfs:/x``                    ``dbfs:/x``                 ``/dbfs/x`` (Databricks FUSE)
``/dbfs/x``                    ``dbfs:/x``                 ``/dbfs/x``
``/Volumes/c/s/v/x``           ``/Volumes/c/s/v/x``        ``/Volumes/c/s/v/x``
``file:/x``, ``file:///x``     ``file:///x``               ``/x``
``x`` (relative or absolute)   ``file:///abs/x``           ``/abs/x``
``s3://b/x`` and other schemes ``s3://b/x``                none
=============================  ==========================  ==============================

:func:`require_local` is the one check that a path has a local form (local disk, ``/dbfs`` FUSE, ``/Volumes``)
for code that opens it with plain file I/O: the ranks, the side tools, ``load_data``.

:func:`redact` is the one way a URI is shown or recorded: every message, log record, JSON output, manifest, MLflow
param and run file that names a place goes through it, so a credential written into a URI (``s3://KEY:SECRET@...``,
``?account_key=...``) stays in the process.
"""

import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse, urlsplit, urlunsplit

from spark_mnist.errors import SourceError, invalid

__all__ = ["Location", "normalize_uri", "redact", "require_local", "check_visible_to_executors"]

DBFS_FUSE_ROOT = "/dbfs"
VOLUMES_ROOT = "/Volumes"
_MOUNTS = {"dbfs": DBFS_FUSE_ROOT, "volume": VOLUMES_ROOT}  # the FUSE mount each kind of place needs
# A URI in free text: a scheme, "://", then everything up to whitespace or a quote.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# Query parameters that carry a credential: pyarrow's S3 and Azure options (access_key, secret_key, session_token,
# account_key, sas_token), SAS signatures (sig), presigned URLs (X-Amz-Signature, X-Amz-Credential,
# X-Amz-Security-Token), and any other whose name says key, secret, token, password, signature or credential.
_SECRET_PARAM = re.compile(
    r"(?<=[?&;])([^=&#\s]*(?:key|secret|token|passw|sig|credential|auth(?!ority))[^=&#\s]*)=([^&#\s]*)", re.IGNORECASE
)
# A URI's scheme and userinfo: what comes before the last "@" ahead of its path, query or fragment.
_USERINFO = re.compile(r"^([^:/?#]+)://([^/?#]*)@")
# Schemes whose userinfo is a container name, not a credential: abfss://container@account.dfs.core.windows.net.
_CONTAINER_SCHEMES = ("abfs", "abfss", "az", "wasb", "wasbs")


@dataclass(frozen=True)
class Location:
    """A normalised place: ``uri`` is what Spark reads and writes; ``local_path`` is the same place on this
    machine's file system, or ``None`` where there is no such path (object stores, ``dbfs:/`` off Databricks)."""

    uri: str
    local_path: str | None
    kind: str  # "local", "dbfs", "volume" or "remote"

    def join(self, *parts: str) -> "Location":
        """The location of ``parts`` below this one; a URI's query string (``?endpoint_override=...``) stays at
        its end."""
        return self._moved(lambda path: posixpath.join(path, *parts))

    @property
    def name(self) -> str:
        """The last part of the path (the file or directory name)."""
        return posixpath.basename(urlsplit(self.uri).path.rstrip("/") if "?" in self.uri else self.uri.rstrip("/"))

    def sibling(self, name: str) -> "Location":
        """A location beside this one, in the same parent directory (a URI's query string stays at its end)."""
        return self._moved(lambda path: posixpath.join(posixpath.dirname(path.rstrip("/")), name))

    def _moved(self, change: Callable[[str], str]) -> "Location":
        """This location with its path (and local path) changed by ``change``; a URI's query string (an object
        store's endpoint, credentials) and the rest stay as they are.  URIs without a query are changed as plain
        strings (``dbfs:/x``, ``file:///x`` keep their spelling)."""
        parts = urlsplit(self.uri)
        uri = urlunsplit(parts._replace(path=change(parts.path or "/"))) if "?" in self.uri else change(self.uri)
        return Location(uri, change(self.local_path) if self.local_path is not None else None, self.kind)

    @property
    def display(self) -> str:
        """The place as file I/O opens it: its local path where it has one, else its URI (credentials included)."""
        return self.local_path or self.uri

    @property
    def shown(self) -> str:
        """How messages, logs and records name the place: :attr:`display` with its credentials redacted
        (:func:`redact`)."""
        return redact(self.display)

    @property
    def os_path(self) -> str | None:
        """The path :mod:`os` operates on for this place where it can operate on it directly (local disk, and DBFS
        or a volume where this machine has their FUSE mount), else ``None`` (pyarrow's)."""
        return self.local_path if self.kind == "local" or os.path.exists(_MOUNTS.get(self.kind, "")) else None


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it shown as ``***``: the userinfo (``s3://KEY:SECRET@bucket``
    -> ``s3://***@bucket``; for Azure's ``abfss://container@account...`` only a password after the container) and
    the value of every query parameter that names a credential (``?account_key=***&blob_storage_authority=...``).
    Everything else, the rest of the URI and the text around it included, stays as it was.

    Args:
        text: a URI, a path, or a message, JSON document or traceback that may name URIs.
    Returns:
        The redacted text (``text`` itself where it names no credential).
    """
    return _URI.sub(_redact_uri, text) if "://" in text else text


def _redact_uri(match: re.Match[str]) -> str:
    uri, userinfo = match.group(0), _USERINFO.match(match.group(0))
    if userinfo is not None:
        scheme, user = userinfo.groups()
        # Azure's abfss://container@account...: the container name stays, a password after it does not.
        user = re.sub(":.*", ":***", user) if scheme.lower() in _CONTAINER_SCHEMES else "***"
        uri = f"{scheme}://{user}@{uri[userinfo.end() :]}"
    return _SECRET_PARAM.sub(r"\g<1>=***", uri)


def normalize_uri(path: str | os.PathLike) -> Location:
    """Normalise any accepted spelling of a directory or file (see the module docstring's table).

    Raises:
        SourceError: an empty path.
    """
    text = os.fspath(path).strip()
    if not text:
        raise invalid("path", text, "a directory, file:/, dbfs:/, /dbfs/ or /Volumes/ path", SourceError)
    parsed = urlparse(text)
    if parsed.scheme == "dbfs":
        text = DBFS_FUSE_ROOT + "/" + (parsed.netloc + parsed.path).lstrip("/")
    elif parsed.scheme == "file":
        text = "/" + (parsed.netloc + parsed.path).lstrip("/") if parsed.netloc else parsed.path
    elif len(parsed.scheme) > 1:  # s3://, abfss://, gs://, ... (a one-letter scheme is a drive)
        return Location(text, None, "remote")
    absolute = os.path.abspath(os.path.expanduser(text))
    if absolute == DBFS_FUSE_ROOT or absolute.startswith(DBFS_FUSE_ROOT + "/"):
        return Location(f"dbfs:{absolute[len(DBFS_FUSE_ROOT) :] or '/'}", absolute, "dbfs")
    if absolute.startswith(VOLUMES_ROOT + "/"):
        return Location(absolute, absolute, "volume")
    return Location(Path(absolute).as_uri(), absolute, "local")


def check_visible_to_executors(master: str | None, location: Location) -> None:
    """Refuse a driver-local path when executors run on other machines and could not read it.

    Args:
        master: the Spark master URL of a cluster whose driver runs on this machine (``local[2]``,
            ``spark://...``), or ``None`` for a Spark Connect server elsewhere (Databricks Connect, serverless),
            whose executors never see this machine's disk.
    Raises:
        SourceError: a local-disk path with a cluster master (not ``local``/``local-cluster``) or with ``None``.
    """
    if location.kind != "local" or (master is not None and master.startswith("local")):
        return
    who = f"executors of master {master!r}" if master is not None else "the executors of the Spark Connect server"
    raise SourceError(
        f"{location.local_path}: a path on the driver's local disk, which {who} cannot see; copy the files to "
        f"dbfs:/... or /Volumes/<catalog>/<schema>/<volume>/... and use that"
    )


def require_local(path: str | os.PathLike, what: str) -> str:
    """The local (or FUSE: ``/dbfs/...``, ``/Volumes/...``) path of ``path``, for code that opens it with plain file
    I/O; ``file:``, ``dbfs:`` and plain paths all have one.

    Args:
        path: any spelling :func:`normalize_uri` accepts.
        what: who needs the path or what it is, for the message (e.g. ``"verify"``, ``"the dataset"``).
    Raises:
        SourceError: ``path`` has no local form (``s3://...``, ``abfss://...``).
    """
    if (local_path := normalize_uri(path).local_path) is None:
        raise SourceError(
            f"{redact(os.fspath(path))}: {what} takes local paths only (local disk, file:/, /dbfs/..., "
            f"/Volumes/..., dbfs:/ on Databricks), opened as files on this machine; copy the files to "
            f"(or afterwards from) such a path"
        )
    return local_path
