"""The code blocks of README and docs/ are checked as a user would copy them: Python blocks parse, and every
``spark_mnist`` name they use exists, with every keyword of ``spark_mnist.ingest``/``train`` a setting of its
section; every ``spark-mnist`` command line uses a subcommand and options the parser has.  (Blocks that need
Databricks cannot run here; the test kit's and the examples' own tests run those that can.)"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from spark_mnist.cli import build_parser
from spark_mnist.config import Settings
from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
NOTEBOOK_MAGIC = re.compile(r"^\s*[%!].*$", re.MULTILINE)  # %pip, !ls: a notebook's, not Python's


def _blocks(language: str) -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        if "_build" in page.parts:
            continue
        for lang, body in FENCE.findall(page.read_text(encoding="utf-8")):
            if lang == language:
                found.append((f"{page.relative_to(REPO)}", body))
    return found


def _exists(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        return _has_path(module, parts[cut:])
    return False


def _has_path(obj, names: list[str]) -> bool:
    for name in names:
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


@pytest.mark.parametrize("where, code", _blocks("python"), ids=lambda v: v if "\n" not in str(v) else "")
def test_python_blocks_parse_and_name_what_exists(where, code):
    tree = ast.parse(NOTEBOOK_MAGIC.sub("", code).replace("...", "pass"), where)
    aliases = {a.asname or a.name: a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
               for a in n.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spark_mnist"):
            for alias in node.names:
                module = importlib.import_module(node.module)
                assert _has_path(module, [alias.name]), f"{where}: {node.module}.{alias.name}"
        name = _dotted(node) if isinstance(node, ast.Attribute) else None
        if name and name.split(".")[0] in aliases and aliases[name.split(".")[0]].startswith("spark_mnist"):
            full = ".".join([aliases[name.split(".")[0]], *name.split(".")[1:]])
            assert _exists(full), f"{where}: {full} does not exist"
        if isinstance(node, ast.Call) and _dotted(node.func) in ("spark_mnist.ingest", "spark_mnist.train"):
            section = _dotted(node.func).rsplit(".", 1)[1]
            allowed = set(Settings.__fields__[section].type_.__fields__) | {"config", "spark", "launcher"}
            unknown = [k.arg for k in node.keywords if k.arg not in allowed]
            assert not unknown, f"{where}: {section} takes no setting {unknown}"


def _command_lines() -> list[tuple[str, list[str]]]:
    lines = []
    for where, body in _blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("spark-mnist "):
                lines.append((where, shlex.split(line)[1:]))
    return lines


@pytest.mark.parametrize("where, argv", _command_lines(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_command_lines_use_options_the_parser_has(where, argv):
    parser = build_parser()
    argv = [a for a in argv if not (a.startswith("[") or a.endswith("]") or a.isupper() or a == "...")]
    try:
        parser.parse_known_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: spark-mnist {' '.join(argv)} is refused by the parser ({e})")
    _, unknown = parser.parse_known_args(argv)
    assert not [a for a in unknown if a.startswith("--")], f"{where}: unknown options {unknown}"
