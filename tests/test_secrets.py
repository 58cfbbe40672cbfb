"""Credentials inside a URI stay in the process; an object-store source is read, or refused in one line.

:func:`spark_mnist.paths.redact` is checked on its own; then the commands run as a user runs them, in child processes
against Azurite and moto's S3 server (:mod:`tests.stores.servers`): the source on Azure (an account key in its URI),
the output and the training data on S3 (an access key and secret in the URI's user info), MLflow on.  Neither store's
secret appears in stdout, stderr, the run directory (its MLflow store included) or the manifest.  One run with both
stores, rather than one a store: each run starts a driver JVM, a launcher and its ranks.  A bare ``s3://`` source,
which local Spark (no ``hadoop-aws``) cannot read, is read through pyarrow on the driver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from spark_mnist import fs
from spark_mnist.paths import normalize_uri, redact
from spark_mnist.shards.contract import MANIFEST_NAME
from tests.conftest import REPO, write_dataset
from tests.stores.servers import AZURITE_KEY, BUCKET

KEY_ID, SECRET = "AKIDLEAK", "SECRETLEAK123"
TRAIN = ["--launcher", "torchrun", "--num-processes", "1", "--epochs", "1", "--batch-size", "64"]


@pytest.mark.parametrize("given, shown", [
    ("s3://AKID:SECRET@bucket/x?endpoint_override=127.0.0.1:9000&scheme=http",
     "s3://***@bucket/x?endpoint_override=127.0.0.1:9000&scheme=http"),
    ("s3://bucket/x?access_key=AKID&secret_key=SECRET&session_token=TOKEN&region=eu-west-1",
     "s3://bucket/x?access_key=***&secret_key=***&session_token=***&region=eu-west-1"),
    ("abfss://c@acct.dfs.core.windows.net/x?account_key=K%2F1%3D&blob_storage_authority=127.0.0.1:1",
     "abfss://c@acct.dfs.core.windows.net/x?account_key=***&blob_storage_authority=127.0.0.1:1"),
    ("abfss://c@acct.dfs.core.windows.net/x?sas_token=sv%3D2020%26sig%3Dabc", "abfss://c@acct.dfs.core.windows.net/x?sas_token=***"),
    ("https://acct.blob.core.windows.net/c/f?sv=2020-08-04&sig=abc%2B&se=2030", "https://acct.blob.core.windows.net/c/f?sv=2020-08-04&sig=***&se=2030"),
    ("gs://bucket/x", "gs://bucket/x"),
    ("/Volumes/main/default/raw", "/Volumes/main/default/raw"),
    ("error: s3://A:B@b/x: not found; see 'gs://u:p@c/y'", "error: s3://***@b/x: not found; see 'gs://***@c/y'"),
])
def test_redact_hides_userinfo_and_credential_parameters(given, shown):
    assert redact(given) == shown
    assert redact(shown) == shown


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "spark_mnist.cli", *args], capture_output=True, text=True,
                            timeout=600, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _upload(source: Path, uri: str) -> None:
    location = normalize_uri(uri)
    filesystem, root = fs.filesystem(location)
    for path in source.iterdir():
        with filesystem.open_output_stream(f"{root.rstrip('/')}/{path.name}") as f:
            f.write(path.read_bytes())


def _find(secrets: list[str], texts: dict[str, str]) -> list[str]:
    return [f"{secret!r} in {where}" for where, text in texts.items() for secret in secrets if secret in text]


def _files(root: Path) -> dict[str, str]:
    return {str(p): p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.full
def test_credentials_in_uris_are_never_shown(azure_root, s3_root, tmp_path):
    """Ingest a source on Azure into an output on S3, then train on that output with MLflow on (its run directory
    defaults to ./runs/NAME): no secret anywhere, and the manifest records the source redacted."""
    pytest.importorskip("mlflow")
    write_dataset(tmp_path / "raw", train_rows=300, test_rows=60)
    source = azure_root(f"raw-{tmp_path.name}")
    output = s3_root(f"mnist-{tmp_path.name}").replace("testing:testing", f"{KEY_ID}:{SECRET}")
    _upload(tmp_path / "raw", source)
    work = tmp_path / "work"
    work.mkdir()
    ingest = _run(["ingest", "--source", source, "--output", output, "--num-shards", "2"], work)
    assert json.loads(ingest.stdout.splitlines()[-1])["rows"] == {"train": 300, "test": 60}
    train = _run(["train", "--data", output, *TRAIN], work)
    metrics = json.loads(train.stdout.splitlines()[-1])
    run_dir = work / "runs" / f"mnist-{tmp_path.name}"
    assert metrics["mlflow_run_id"] and (run_dir / "model.pt").is_file() and (run_dir / "mlruns").is_dir()
    store, path = fs.filesystem(normalize_uri(output).join(MANIFEST_NAME))
    with store.open_input_stream(path) as stream:
        manifest = stream.read().decode()
    texts = {"ingest stdout": ingest.stdout, "ingest stderr": ingest.stderr, "train stdout": train.stdout,
             "train stderr": train.stderr, "the manifest": manifest, **_files(work)}
    secrets = [SECRET, KEY_ID, AZURITE_KEY, quote(AZURITE_KEY, safe=""), AZURITE_KEY[:20]]
    assert not _find(secrets, texts)
    assert "***" in json.loads(manifest)["source"]["uri"]


@pytest.mark.slow
@pytest.mark.full
def test_a_bare_s3_source_local_spark_cannot_read_is_read_through_pyarrow(s3_root, tmp_path):
    """``s3://bucket/raw`` with the endpoint and credentials in the environment: local Spark has no ``s3``
    file system, so the driver reads the files through pyarrow; no Java traceback."""
    write_dataset(tmp_path / "raw", train_rows=300, test_rows=60)
    credentialed = s3_root(f"bare-{tmp_path.name}")
    _upload(tmp_path / "raw", credentialed)
    endpoint = credentialed.split("endpoint_override=", 1)[1].split("&", 1)[0]
    env = {"AWS_ENDPOINT_URL": f"http://{endpoint}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    result = _run(["ingest", "--source", f"s3://{BUCKET}/bare-{tmp_path.name}", "--output", str(tmp_path / "out"),
                   "--num-shards", "2"], tmp_path, env)
    assert json.loads(result.stdout.splitlines()[-1])["rows"] == {"train": 300, "test": 60}
    assert "through pyarrow on the driver" in result.stdout
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr, result.stderr
