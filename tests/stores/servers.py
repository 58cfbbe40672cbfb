"""Store servers on 127.0.0.1 for the tests, as fixtures (a pytest plugin of tests/conftest.py): moto's standalone
S3 server and Azurite's blob service, each skipped with the reason where it cannot start here
(``tests/stores/setup.sh`` installs them)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

REPO = Path(__file__).resolve().parents[2]

AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
# Azurite's full command: azurite-blob 3.35 ignores --blobKeepAliveTimeout (its getter reads another flag).
AZURITE_BIN = REPO / ".cache" / "stores" / "node_modules" / ".bin" / "azurite"
AZURITE_KEEP_ALIVE_S = 600  # seconds, past the Azure SDK's 60 s; see azure_root
BUCKET = "spark-mnist"
START_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.skip(f"{what} exited at start (code {process.returncode})")
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        time.sleep(0.1)
    process.kill()
    pytest.skip(f"{what} did not answer on 127.0.0.1:{port} within {START_TIMEOUT_S} s")


@contextlib.contextmanager
def _server(command: list[str], port: int, what: str):
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, process, what)
        yield
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="session")
def s3_root():
    """A bucket on moto's standalone S3 server on 127.0.0.1; yields a function of a name giving an ``s3://`` OUT
    whose URI carries the endpoint and credentials (so Spark's workers and child processes reach it too)."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (tests/stores/setup.sh)")
    from pyarrow import fs as pafs

    port = _free_port()
    with _server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, "moto_server"):
        pafs.S3FileSystem(access_key="testing", secret_key="testing", endpoint_override=f"127.0.0.1:{port}",
                          scheme="http", region="us-east-1", allow_bucket_creation=True).create_dir(BUCKET)
        yield lambda name: (f"s3://testing:testing@{BUCKET}/{name}?endpoint_override=127.0.0.1:{port}"
                            f"&scheme=http&region=us-east-1")


@pytest.fixture(scope="session")
def azure_root(tmp_path_factory):
    """A container on Azurite's blob service on 127.0.0.1 (the project-local npm install of tests/stores/setup.sh),
    reached through pyarrow's AzureFileSystem; yields a function of a name giving an ``abfss://`` OUT."""
    from spark_mnist.fs import _pyarrow_has_azure

    if not _pyarrow_has_azure():
        import pyarrow

        pytest.skip(f"pyarrow {pyarrow.__version__} has no AzureFileSystem (pyarrow >= 16)")
    if not AZURITE_BIN.exists():
        pytest.skip(f"Azurite is not installed at {AZURITE_BIN} (tests/stores/setup.sh)")
    from pyarrow import fs as pafs

    port = _free_port()
    location = tmp_path_factory.mktemp("azurite")
    # pyarrow deletes a blob under a lease it releases afterwards; Azurite at times (measured: 2 of ~300 deletes)
    # leaves its answer to that release (404: the blob is gone) unfinished, and the client waits until the connection
    # closes, then retries.  With Azurite's 5 s keep-alive, Azurite closes it (7 s), and so it also closes idle
    # connections the Azure SDK still pools (60 s): a client whose retries all meet a closed connection, in the
    # lease's release (a destructor), aborts the process (apache/arrow GH-44286; it aborted test passes, a writer's
    # and pytest's own, with a keep-alive of 5 s and of 1 s).  With a keep-alive past the SDK's 60 s, Azurite never
    # closes a connection under the client, whose own 60 s timeout ends such a wait: slower, and no abort seen.
    command = [str(AZURITE_BIN), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(location),
               "--blobKeepAliveTimeout", str(AZURITE_KEEP_ALIVE_S), "--queuePort", "0", "--tablePort", "0",
               "--silent", "--disableTelemetry", "--skipApiVersionCheck", "--loose"]
    with _server(command, port, "azurite-blob"):
        endpoint = f"127.0.0.1:{port}"
        pafs.AzureFileSystem(account_name="devstoreaccount1", account_key=AZURITE_KEY, blob_storage_authority=endpoint,
                             dfs_storage_authority=endpoint, blob_storage_scheme="http",
                             dfs_storage_scheme="http").create_dir(BUCKET)
        yield lambda name: (f"abfss://{BUCKET}@devstoreaccount1.dfs.core.windows.net/{name}?account_key="
                            f"{quote(AZURITE_KEY, safe='')}&blob_storage_authority={endpoint}&dfs_storage_authority="
                            f"{endpoint}&blob_storage_scheme=http&dfs_storage_scheme=http")
