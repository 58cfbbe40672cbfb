"""One wheel for every supported runtime: the dependency ranges admit each runtime's libraries, the lanes' locks are
inside the ranges, and installing the package into this lane's environment would replace nothing."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

RUNTIMES = sorted((REPO / "requirements" / "runtimes").glob("*.txt"))
LOCKS = sorted((REPO / "requirements" / "lanes").glob("*.txt"))


def pins(path: Path) -> dict[str, Version]:
    """``name==version`` lines of a runtime or lock file, by canonical name (local versions such as +cpu kept)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[canonicalize_name(name.split("[", 1)[0])] = Version(version)
    return found


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirements(extra: str | None = None) -> list[Requirement]:
    listed = project()["dependencies"] if extra is None else project()["optional-dependencies"][extra]
    return [Requirement(r) for r in listed]


def out_of_range(reqs: list[Requirement], versions: dict[str, Version]) -> list[str]:
    return [f"{r} excludes {r.name} {versions[canonicalize_name(r.name)]}" for r in reqs
            if canonicalize_name(r.name) in versions
            and not r.specifier.contains(versions[canonicalize_name(r.name)], prereleases=True)]


def test_the_runtime_tables_are_there():
    assert {p.stem for p in RUNTIMES} >= {"dbr-15.4-lts-ml", "dbr-16.4-lts-ml", "dbr-17.3-lts-ml", "spark-4.1"}
    assert {p.stem for p in LOCKS} == {"spark35", "spark40", "spark4-latest"}


@pytest.mark.parametrize("runtime", RUNTIMES, ids=lambda p: p.stem)
def test_dependency_ranges_admit_every_runtimes_libraries(runtime):
    versions = pins(runtime)
    assert {"pyspark", "pyarrow", "numpy", "pandas"} <= versions.keys()
    assert out_of_range(requirements(), versions) == []
    # The extras that run there too: pyspark's range (local) and MLflow's.
    assert out_of_range(requirements("local") + requirements("mlflow"), versions) == []


def test_petastorm_extra_admits_what_15_4_ships():
    versions = pins(REPO / "requirements" / "runtimes" / "dbr-15.4-lts-ml.txt")
    assert out_of_range(requirements("petastorm"), versions) == []


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.stem)
def test_each_lane_lock_is_inside_the_ranges(lock):
    versions = pins(lock)
    assert out_of_range(requirements() + requirements("dev") + requirements("torch"), versions) == []
    assert ("petastorm" in versions) == (lock.stem == "spark35")


def test_no_module_imports_petastorm_at_import_time():
    """petastorm is optional: only function bodies may import it."""
    offenders = []
    for path in sorted((REPO / "spark_mnist").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "petastorm"]
    assert offenders == []


@pytest.mark.slow
def test_installing_the_package_here_replaces_nothing(tmp_path):
    """pip's own resolver, in this lane's environment (a runtime's stack): the package would be the only install."""
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                             "--disable-pip-version-check", str(REPO)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    installs = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert installs == ["spark-mnist"]


@pytest.mark.slow
@pytest.mark.one_lane
def test_the_wheel_carries_its_package_data_licence_and_version(tmp_path):
    """The built wheel holds ``log4j2.properties`` (which ``driver/session.py`` hands to Spark's JVM), the licence,
    and the one version, which ``spark_mnist.__version__`` reads back from the installed metadata."""
    import zipfile

    import spark_mnist

    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                             "--disable-pip-version-check", "-w", str(tmp_path), str(REPO)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("spark_mnist-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "spark_mnist/log4j2.properties" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert wheel.name.startswith(f"spark_mnist-{spark_mnist.__version__}-")
    # The extras a user installs from the wheel are pyproject's (tests/test_install_docs.py checks the docs' lines
    # against pyproject): every extra, with every requirement, in the wheel's METADATA.
    from email.parser import Parser

    (metadata_name,) = [name for name in names if name.endswith(".dist-info/METADATA")]
    metadata = Parser().parsestr(zipfile.ZipFile(wheel).read(metadata_name).decode())
    assert set(metadata.get_all("Provides-Extra")) == set(project()["optional-dependencies"])
    in_wheel = {(canonicalize_name(r.name), str(r.marker)) for r in map(Requirement, metadata.get_all("Requires-Dist"))
                if r.marker is not None}
    for extra, reqs in project()["optional-dependencies"].items():
        for req in map(Requirement, reqs):
            assert (canonicalize_name(req.name), f'extra == "{extra}"') in in_wheel, (extra, str(req))


def test_the_test_kit_is_opt_in():
    """No pytest11 entry point: the kit's fixtures (a ``spark`` among them) reach only suites that load it."""
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    assert "pytest11" not in project.get("entry-points", {})


def test_torch_is_an_extra_not_a_dependency():
    assert not [r for r in requirements() if canonicalize_name(r.name) == "torch"]
    assert [r.name for r in requirements("torch")] == ["torch", "pillow"]


@pytest.mark.parametrize("runtime", RUNTIMES, ids=lambda p: p.stem)
def test_the_torch_extra_admits_what_each_runtime_ships(runtime):
    assert out_of_range(requirements("torch"), pins(runtime)) == []


@pytest.mark.slow
@pytest.mark.full
def test_without_torch_ingest_verify_load_data_and_preview_work_and_training_names_the_extra(small_source,
                                                                                             tmp_path):
    """In a process (and its Spark workers) where ``import torch`` fails: the torch-free commands work; train and
    evaluate exit 2 with one line naming the ``torch`` extra."""
    import os

    source, _ = small_source
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(REPO)])}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "spark_mnist.cli", *args], capture_output=True, text=True,
                              timeout=600, cwd=tmp_path, env=env)

    out = tmp_path / "out"
    assert cli("verify", "--source", str(source), "--allow-hash-mismatch").returncode == 0
    ingested = cli("ingest", "--source", str(source), "--output", str(out), "--num-shards", "2")
    assert ingested.returncode == 0, ingested.stderr[-3000:]
    assert cli("preview", "--data", str(out), "--out", str(tmp_path / "grid.png")).returncode == 0
    loaded = subprocess.run([sys.executable, "-c", f"import spark_mnist, sys; (x, y), _ = spark_mnist.load_data("
                             f"{str(out)!r}, 'fashion-mnist'); assert 'torch' not in sys.modules or "
                             f"sys.modules['torch'] is None; print(x.shape)"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert loaded.returncode == 0 and "(600, 28, 28)" in loaded.stdout, loaded.stderr[-3000:]
    for command in (["train", "--data", str(out), "--launcher", "torchrun"],
                    ["evaluate", "--data", str(out), "--model", str(tmp_path / "model.pt")]):
        result = cli(*command)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
        assert "needs torch" in lines[0] and "spark-mnist[torch]" in lines[0], lines[0]
