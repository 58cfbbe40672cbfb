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
    assert out_of_range(requirements() + requirements("dev"), versions) == []
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
