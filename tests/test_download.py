"""spark_mnist.tools.download and spark_mnist.formats.keras_npz against a local HTTP server on 127.0.0.1 (no internet).

The server's behaviour per URL path is configurable: serve (with Range support), 403, 503 then serve, drop the
connection half way, a truncated body, an HTML page with 200, another valid IDX file (wrong sha256).
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import logging
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import requests

from spark_mnist.datasets import IMAGES, LABELS, SPLITS, DatasetFile, DatasetSpec, get_dataset
from spark_mnist.tools.download import LocalRoots, download
from spark_mnist.errors import InputError, SourceError
from spark_mnist.formats.idx import encode_idx, parse_idx
from spark_mnist.formats.keras_npz import load_keras_npz, npz_to_idx_dir
from spark_mnist.tools.verify import verify_source

ROWS = {"train": 24, "test": 12}
HTML = b"<!DOCTYPE html><html><head><title>404</title></head><body>Not here</body></html>\n"
NO_LOCAL = LocalRoots()
TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"


# --------------------------------------------------------------------------------------------------- test data


def make_arrays(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {split: (rng.integers(0, 256, size=(rows, 28, 28), dtype=np.uint8),
                    (np.arange(rows) % 10).astype(np.uint8)) for split, rows in ROWS.items()}


@dataclass
class Files:
    """The gz bytes and payload sha256 of each standard file name."""

    gz: dict[str, bytes]
    sha256: dict[str, str]
    arrays: dict[str, tuple[np.ndarray, np.ndarray]]


def make_files(seed: int = 0) -> Files:
    arrays = make_arrays(seed)
    spec = get_dataset("mnist")
    gz, sha = {}, {}
    for split in SPLITS:
        for kind, array in zip((IMAGES, LABELS), arrays[split]):
            name = spec.file(split, kind).name
            payload = encode_idx(array)
            gz[name] = gzip.compress(payload, mtime=0)
            sha[name] = hashlib.sha256(payload).hexdigest()
    return Files(gz, sha, arrays)


def make_spec(files: Files, mirrors=(), name: str = "tiny-mnist") -> DatasetSpec:
    """A registry entry shaped like MNIST with our small files' hashes and sizes."""
    base = get_dataset("mnist")
    entries = {split: {kind: DatasetFile(base.file(split, kind).name, files.sha256[base.file(split, kind).name])
                       for kind in (IMAGES, LABELS)} for split in SPLITS}
    return replace(base, name=name, files=entries, split_sizes=dict(ROWS), mirrors=tuple(mirrors))


# ------------------------------------------------------------------------------------------------ HTTP server


@dataclass
class ServerState:
    bodies: dict[str, bytes] = field(default_factory=dict)   # URL path -> bytes served
    modes: dict[str, str] = field(default_factory=dict)      # URL path -> behaviour (default "ok")
    log: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header) per request
    lock: threading.Lock = field(default_factory=threading.Lock)

    def requests_for(self, path: str) -> list[str | None]:
        with self.lock:
            return [rng for p, rng in self.log if p == path]


class Handler(http.server.BaseHTTPRequestHandler):
    """Behaviours: ok, no-range, 403, 404, 503-then-ok, drop, drop-no-range, drop-always, truncated, html."""

    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        range_header = self.headers.get("Range")
        with state.lock:
            state.log.append((self.path, range_header))
            count = sum(1 for p, _ in state.log if p == self.path)
        mode = state.modes.get(self.path, "ok")
        body = state.bodies.get(self.path)
        if body is None or mode == "404":
            return self._status(404, "Not Found")
        if mode == "403":
            return self._status(403, "Forbidden")
        if mode == "503-then-ok" and count <= 2:
            return self._status(503, "Service Unavailable")
        if mode == "html":
            return self._send(200, HTML, content_type="text/html")
        if mode == "truncated":
            return self._send(200, body[: len(body) // 2])
        if mode == "drop-always" or (mode == "drop" and not range_header):
            return self._drop(body, range_header)
        if mode == "drop-no-range" and count == 1:
            return self._drop(body, None)
        if mode in ("no-range", "drop-no-range") or not range_header:
            return self._send(200, body)
        return self._send_range(body, range_header)

    def _status(self, code: int, reason: str) -> None:
        self.send_response(code, reason)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, code: int, data: bytes, content_type: str = "application/octet-stream",
              extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_range(self, body: bytes, range_header: str) -> None:
        start = int(range_header.removeprefix("bytes=").split("-")[0])
        if start >= len(body):
            self.send_response(416, "Range Not Satisfiable")
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send(206, body[start:], extra={"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})

    def _drop(self, body: bytes, range_header: str | None) -> None:
        """Headers promising the whole (remaining) body, then half of it, then close the connection."""
        start = int(range_header.removeprefix("bytes=").split("-")[0]) if range_header else 0
        rest = body[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(rest)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        self.wfile.write(rest[: max(1, len(rest) // 2)])
        self.wfile.flush()
        self.close_connection = True


@dataclass
class Server:
    url: str
    state: ServerState

    def publish(self, mirror: str, files: Files, modes: dict[str, str] | None = None) -> str:
        """Serve ``files`` under ``/<mirror>/``; returns the mirror's base URL."""
        for name, data in files.gz.items():
            self.state.bodies[f"/{mirror}/{name}"] = data
        for name, mode in (modes or {}).items():
            self.state.modes[f"/{mirror}/{name}"] = mode
        return f"{self.url}/{mirror}/"


@pytest.fixture
def server(monkeypatch):
    for var in ("NO_PROXY", "no_proxy"):  # a proxy configured in the environment must not see 127.0.0.1
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    state = ServerState()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", state)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def files() -> Files:
    return make_files()


def fetch(spec, dest, **kwargs):
    """download() with no local roots, no real sleeping, a short timeout."""
    sleeps = kwargs.pop("sleeps", [])
    kwargs.setdefault("local_roots", NO_LOCAL)
    return download(spec, dest, retries=kwargs.pop("retries", 3), backoff=0.5, timeout=5,
                    sleep=sleeps.append, **kwargs)


def assert_verified(result: dict[str, Path], files: Files) -> None:
    assert sorted(result) == sorted(files.gz)
    for name, path in result.items():
        assert path.name == name and path.is_file()
        assert path.read_bytes()[:2] == b"\x1f\x8b"
        assert parse_idx(path).sha256 == files.sha256[name]
        assert not path.with_name(name + ".part").exists()


def assert_nothing_under_final_names(dest: Path, names) -> None:
    for name in names:
        assert not (dest / name).exists(), f"{name} left under its final name"
    assert not list(dest.glob(".*.tmp-*"))


# -------------------------------------------------------------------------------------------------- network


def test_downloads_and_verifies_all_files(server, files, tmp_path):
    spec = make_spec(files, [server.publish("m1", files)])
    result = fetch(spec, tmp_path / "out")
    assert_verified(result, files)
    assert list(result) == [spec.file(s, k).name for s in SPLITS for k in (IMAGES, LABELS)]
    assert verify_source(tmp_path / "out", spec).ok


def test_403_moves_to_next_mirror_without_retrying(server, files, tmp_path):
    m1 = server.publish("m1", files, {name: "403" for name in files.gz})
    m2 = server.publish("m2", files)
    sleeps: list[float] = []
    session = requests.Session()  # a caller's session is used, and left open
    close, closes = session.close, []
    session.close = lambda: closes.append(True)  # type: ignore[method-assign]
    try:
        result = fetch(make_spec(files, [m1, m2]), tmp_path, sleeps=sleeps, session=session)
        assert closes == []
    finally:
        close()
    assert_verified(result, files)
    assert server.state.requests_for(f"/m1/{TRAIN_IMAGES}") == [None]
    assert sleeps == []


def test_503_is_retried_with_exponential_backoff(server, files, tmp_path):
    m1 = server.publish("m1", files, {TRAIN_IMAGES: "503-then-ok"})
    sleeps: list[float] = []
    result = fetch(make_spec(files, [m1]), tmp_path, sleeps=sleeps)
    assert_verified(result, files)
    assert len(server.state.requests_for(f"/m1/{TRAIN_IMAGES}")) == 3
    assert sleeps == [0.5, 1.0]


def test_dropped_connection_resumes_with_range(server, files, tmp_path):
    m1 = server.publish("m1", files, {TRAIN_IMAGES: "drop", TRAIN_LABELS: "drop"})
    result = fetch(make_spec(files, [m1]), tmp_path)
    assert_verified(result, files)
    for name in (TRAIN_IMAGES, TRAIN_LABELS):
        ranges = server.state.requests_for(f"/m1/{name}")
        assert ranges[0] is None
        assert ranges[1] == f"bytes={len(files.gz[name]) // 2}-", ranges


def test_server_ignoring_range_restarts_from_zero(server, files, tmp_path):
    m1 = server.publish("m1", files, {TRAIN_IMAGES: "drop-no-range"})
    result = fetch(make_spec(files, [m1]), tmp_path)
    assert_verified(result, files)
    assert server.state.requests_for(f"/m1/{TRAIN_IMAGES}")[1] is not None  # asked for a range, got 200


def test_partial_file_from_earlier_run_is_resumed(server, files, tmp_path):
    m1 = server.publish("m1", files)
    half = len(files.gz[TRAIN_IMAGES]) // 2
    (tmp_path / f"{TRAIN_IMAGES}.part").write_bytes(files.gz[TRAIN_IMAGES][:half])
    result = fetch(make_spec(files, [m1]), tmp_path)
    assert_verified(result, files)
    assert server.state.requests_for(f"/m1/{TRAIN_IMAGES}") == [f"bytes={half}-"]


def test_stale_partial_file_that_fails_verification_is_restarted(server, files, tmp_path):
    m1 = server.publish("m1", files)
    other = make_files(seed=7).gz[TRAIN_IMAGES]
    (tmp_path / f"{TRAIN_IMAGES}.part").write_bytes(other[: len(other) // 3])
    result = fetch(make_spec(files, [m1]), tmp_path)
    assert_verified(result, files)
    ranges = server.state.requests_for(f"/m1/{TRAIN_IMAGES}")
    assert ranges[0] is not None and ranges[-1] is None


def test_truncated_body_falls_back_to_next_mirror(server, files, tmp_path):
    m1 = server.publish("m1", files, {TRAIN_IMAGES: "truncated"})
    m2 = server.publish("m2", files)
    result = fetch(make_spec(files, [m1, m2]), tmp_path)
    assert_verified(result, files)


def test_fuse_targets_stage_partial_downloads_on_local_disk(server, files, tmp_path, monkeypatch):
    """DBFS and volume mounts cannot append: .part files live in a staging directory, finished files are copied."""
    import spark_mnist.tools.download as download_module

    target, staging = tmp_path / "volume", tmp_path / "staging"
    target.mkdir()
    staging.mkdir()
    monkeypatch.setattr(download_module, "_target_dirs", lambda to: (target, staging))
    m1 = server.publish("m1", files, {TRAIN_IMAGES: "drop"})
    result = fetch(make_spec(files, [m1]), "/Volumes/cat/schema/vol/mnist")
    assert_verified(result, files)
    assert all(path.parent == target for path in result.values())
    assert list(staging.iterdir()) == []


def test_html_page_with_200_is_rejected(server, files, tmp_path):
    m1 = server.publish("m1", files, {TRAIN_IMAGES: "html"})
    with pytest.raises(SourceError) as info:
        fetch(make_spec(files, [m1]), tmp_path)
    message = str(info.value)
    assert TRAIN_IMAGES in message and f"{m1}{TRAIN_IMAGES}" in message
    assert "not IDX" in message and "HTML page" in message
    assert_nothing_under_final_names(tmp_path, [TRAIN_IMAGES])
    assert not (tmp_path / f"{TRAIN_IMAGES}.part").exists()


def test_every_mirror_failing_names_each_mirror_and_its_error(server, files, tmp_path):
    m1 = server.publish("m1", files, {TRAIN_IMAGES: "403"})
    m2 = server.publish("m2", files, {TRAIN_IMAGES: "drop-always"})
    m3 = server.publish("m3", files, {TRAIN_IMAGES: "truncated"})
    sleeps: list[float] = []
    with pytest.raises(SourceError) as info:
        fetch(make_spec(files, [m1, m2, m3]), tmp_path, sleeps=sleeps)
    message = str(info.value)
    assert message.startswith(TRAIN_IMAGES)
    assert f"{m1}{TRAIN_IMAGES}: 403 Forbidden" in message
    assert f"{m2}{TRAIN_IMAGES}: connection dropped" in message
    assert f"{m3}{TRAIN_IMAGES}: not IDX" in message and "truncated" in message
    assert sleeps == [0.5, 1.0]  # only m2's drops are retried
    assert_nothing_under_final_names(tmp_path, [TRAIN_IMAGES])


def test_wrong_file_on_mirror_is_a_checksum_failure(server, files, tmp_path):
    other = make_files(seed=3)
    m1 = server.publish("m1", other)
    with pytest.raises(SourceError, match="sha256 mismatch"):
        fetch(make_spec(files, [m1]), tmp_path, retries=1)
    assert_nothing_under_final_names(tmp_path, files.gz)
    assert not list(tmp_path.glob("*.part"))


def test_unreachable_mirror_is_a_source_error(files, tmp_path):
    spec = make_spec(files, ["http://127.0.0.1:9/"])  # discard port: connection refused
    with pytest.raises(SourceError, match="connection failed"):
        fetch(spec, tmp_path, retries=2)


def test_no_mirrors_and_no_local_copy(files, tmp_path):
    with pytest.raises(SourceError, match="no mirror"):
        fetch(make_spec(files, []), tmp_path)


def test_cached_html_saved_as_gz_is_fetched_again(server, files, tmp_path, caplog):
    m1 = server.publish("m1", files)
    (tmp_path / TRAIN_IMAGES).write_bytes(HTML)
    with caplog.at_level(logging.WARNING, logger="spark_mnist.tools.download"):
        result = fetch(make_spec(files, [m1]), tmp_path)
    assert_verified(result, files)
    assert any(TRAIN_IMAGES in r.getMessage() and "fails verification" in r.getMessage() for r in caplog.records)


def test_verified_files_already_present_are_kept_without_network(server, files, tmp_path):
    for name, data in files.gz.items():
        (tmp_path / name).write_bytes(data)
    m1 = server.publish("m1", files)
    result = fetch(make_spec(files, [m1]), tmp_path)
    assert_verified(result, files)
    assert server.state.log == []


def test_bad_arguments(files, tmp_path):
    with pytest.raises(ValueError, match="retries"):
        download(make_spec(files), tmp_path, retries=0, local_roots=NO_LOCAL)
    with pytest.raises(SourceError, match="local path"):
        download(make_spec(files), "s3://bucket/mnist", local_roots=NO_LOCAL)
    with pytest.raises(InputError, match="Invalid dataset"):
        download("no-such-dataset", tmp_path)


# --------------------------------------------------------------------------------------------- local copies


def test_debian_style_directory_is_used_without_network(server, files, tmp_path):
    spec = make_spec(files, [server.publish("m1", files)])
    share = tmp_path / "share"
    (share / spec.name).mkdir(parents=True)
    for name, data in files.gz.items():
        (share / spec.name / name).write_bytes(data)
    result = fetch(spec, tmp_path / "out", local_roots=LocalRoots(datasets=[share]))
    assert_verified(result, files)
    assert server.state.log == []


def test_torchvision_raw_files_gzipped_or_not_are_used(server, files, tmp_path):
    spec = make_spec(files, [server.publish("m1", files)], name="mnist")
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for i, (name, data) in enumerate(files.gz.items()):
        if i % 2:
            (raw / name).write_bytes(data)
        else:  # torchvision keeps the extracted file beside (or instead of) the .gz
            (raw / name.removesuffix(".gz")).write_bytes(gzip.decompress(data))
    result = fetch(spec, tmp_path / "out", local_roots=LocalRoots(torchvision=[tmp_path / "tv"]))
    assert_verified(result, files)
    assert server.state.log == []


def test_keras_npz_is_converted_without_network(server, files, tmp_path):
    spec = make_spec(files, [server.publish("m1", files)], name="mnist")
    keras = tmp_path / "keras" / "datasets"
    keras.mkdir(parents=True)
    (x_train, y_train), (x_test, y_test) = files.arrays["train"], files.arrays["test"]
    np.savez_compressed(keras / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    result = fetch(spec, tmp_path / "out", local_roots=LocalRoots(keras=[keras]))
    assert_verified(result, files)
    assert server.state.log == []


def test_local_copy_failing_verification_is_ignored(server, files, tmp_path, caplog):
    spec = make_spec(files, [server.publish("m1", files)])
    share = tmp_path / "share"
    (share / spec.name).mkdir(parents=True)
    (share / spec.name / TRAIN_IMAGES).write_bytes(HTML)
    with caplog.at_level(logging.WARNING, logger="spark_mnist.tools.download"):
        result = fetch(spec, tmp_path / "out", local_roots=LocalRoots(datasets=[share]))
    assert_verified(result, files)
    assert [p for p, _ in server.state.log] == [f"/m1/{name}" for name in files.gz]
    assert any("ignoring local copy" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian's fashion-mnist absent")
def test_real_debian_fashion_mnist_matches_the_registry(tmp_path):
    result = download("fashion-mnist", tmp_path, mirrors=[], local_roots=LocalRoots(datasets=["/usr/share/datasets"]))
    spec = get_dataset("fashion-mnist")
    for entry in spec.all_files():
        assert result[entry.name] == tmp_path / entry.name
    assert verify_source(tmp_path, "fashion-mnist").ok


# ------------------------------------------------------------------------------------------------ keras_npz


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_load_keras_npz_and_convert(files, tmp_path):
    (x_train, y_train), (x_test, y_test) = files.arrays["train"], files.arrays["test"]
    npz = write_npz(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train.astype(np.int64), x_test=x_test,
                    y_test=y_test)
    loaded = load_keras_npz(npz)
    assert loaded["train"][0].shape == (24, 28, 28) and loaded["train"][1].dtype == np.uint8
    np.testing.assert_array_equal(loaded["test"][0], x_test)
    out = npz_to_idx_dir(npz, tmp_path / "idx", spec=make_spec(files))
    assert verify_source(out, make_spec(files)).ok


@pytest.mark.parametrize("arrays, match", [
    (dict(x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.zeros(2, np.uint8)), "missing key"),
    (dict(x_train=np.zeros((2, 28, 27), np.uint8), y_train=np.zeros(2, np.uint8),
          x_test=np.zeros((1, 28, 28), np.uint8), y_test=np.zeros(1, np.uint8)), r"x_train\]: image shape"),
    (dict(x_train=np.zeros((2, 28, 28), np.float32), y_train=np.zeros(2, np.uint8),
          x_test=np.zeros((1, 28, 28), np.uint8), y_test=np.zeros(1, np.uint8)), "dtype float32"),
    (dict(x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.zeros(3, np.uint8),
          x_test=np.zeros((1, 28, 28), np.uint8), y_test=np.zeros(1, np.uint8)), "counts must match"),
    (dict(x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.array([1, {"a": 1}], dtype=object),
          x_test=np.zeros((1, 28, 28), np.uint8), y_test=np.zeros(1, np.uint8)), "pickled"),
])
def test_load_keras_npz_rejects_bad_archives(tmp_path, arrays, match):
    npz = write_npz(tmp_path / "mnist.npz", **arrays)
    with pytest.raises(InputError, match=match) as info:
        load_keras_npz(npz)
    assert str(npz) in str(info.value)


def test_load_keras_npz_rejects_non_npz(tmp_path):
    bad = tmp_path / "mnist.npz"
    bad.write_bytes(HTML)
    with pytest.raises(InputError, match=str(bad)):
        load_keras_npz(bad)
    with pytest.raises(InputError, match="not found"):
        load_keras_npz(tmp_path / "absent.npz")
