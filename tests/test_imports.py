"""The arrows of README's Architecture section, checked on every import in the package, lazy ones included: the
``import`` statements anywhere in a module (function bodies too) are parsed with ``ast``, resolved to module names
and matched against the crossings that must never happen."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "spark_mnist"

# (importing modules, imported modules, why): a module whose dotted name starts with a prefix of the first tuple
# never imports one whose name starts with a prefix of the second.
RULES = [
    (("spark_mnist.driver",), ("spark_mnist.rank", "spark_mnist.tools", "spark_mnist.launch", "spark_mnist.pipeline",
                              "spark_mnist.torch", "torch"),
     "driver/ runs on the Spark driver: it hands the ranks a TrainJob, the pipeline launches them"),
    (("spark_mnist.rank",), ("spark_mnist.driver", "spark_mnist.launch", "spark_mnist.pipeline", "spark_mnist.cli",
                            "spark_mnist.tools", "pyspark"),
     "rank/ runs in every rank: no Spark, no launcher, no side tool"),
    (("spark_mnist.tools",), ("spark_mnist.rank", "spark_mnist.driver", "spark_mnist.launch", "spark_mnist.pipeline",
                             "pyspark"),
     "tools/ never start training; what evaluation reads lives in shards/"),
    (("spark_mnist.launch",), ("spark_mnist.driver", "spark_mnist.rank", "spark_mnist.tools", "spark_mnist.pipeline"),
     "launch/ starts a function on N ranks; the pipeline says which"),
    (("spark_mnist.tasks",), ("spark_mnist.driver", "spark_mnist.rank", "spark_mnist.launch", "spark_mnist.pipeline",
                             "spark_mnist.tools", "torch"),
     "tasks/ runs inside Spark tasks on executors"),
    (("spark_mnist.shards", "spark_mnist.formats", "spark_mnist.datasets", "spark_mnist.paths", "spark_mnist.fs",
      "spark_mnist.job", "spark_mnist.config", "spark_mnist.errors", "spark_mnist.envs"),
     ("spark_mnist.driver", "spark_mnist.rank", "spark_mnist.launch", "spark_mnist.tools", "spark_mnist.pipeline",
      "spark_mnist.cli", "pyspark", "torch"),
     "the contract and the helpers are importable anywhere: no Spark, no torch, no layer above them"),
]
# Spark appears only in driver/, tasks/ and the TorchDistributor launcher.
SPARK_HOMES = ("spark_mnist.driver", "spark_mnist.tasks", "spark_mnist.launch.torch_distributor")
# Nothing outside driver/session.py touches the JVM side of a session.
JVM_ATTRIBUTES = {"sparkContext", "_jvm", "_jsc", "_jdf"}
JVM_HOME = "spark_mnist.driver.session"
# Crossings tolerated for now, listed so that a new one fails and a fixed one is taken off (none left).
KNOWN: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it; ``from X import y`` counts as X and X.y."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def crossings() -> set[tuple[str, str, str]]:
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        for imported in imports(path):
            for importers, forbidden, why in RULES:
                if under(name, importers) and under(imported, forbidden):
                    found.add((name, imported, why))
            if under(imported, ("pyspark",)) and not under(name, SPARK_HOMES):
                found.add((name, imported, "Spark only in driver/, tasks/ and launch/torch_distributor.py"))
    return found


def test_no_module_crosses_an_arrow():
    new = {c for c in crossings() if (c[0], c[1]) not in KNOWN and not any(
        c[0] == k[0] and c[1].startswith(k[1]) for k in KNOWN)}
    assert sorted(new) == []


def test_known_crossings_are_still_there():
    """When a listed crossing is gone, take it off KNOWN."""
    found = {(c[0], c[1]) for c in crossings()}
    assert KNOWN <= found, KNOWN - found


def test_only_session_touches_the_jvm():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if module_name(path) == JVM_HOME:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in JVM_ATTRIBUTES:
                offenders.append(f"{module_name(path)}:{node.lineno} .{node.attr}")
    assert offenders == []


@pytest.mark.parametrize("source, expected", [
    ("import torch\n", {"torch"}),
    ("def f():\n    from spark_mnist.rank.loader import ShardLoader\n",
     {"spark_mnist.rank.loader", "spark_mnist.rank.loader.ShardLoader"}),
    ("from ..rank import train\n", {"spark_mnist.rank", "spark_mnist.rank.train"}),
])
def test_imports_are_found_lazy_and_relative_ones_included(tmp_path, source, expected, monkeypatch):
    path = PACKAGE / "tools" / "_probe_for_test.py"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source)
    assert imports(path) == expected
