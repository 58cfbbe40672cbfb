"""What import-linter (``make lint``, pyproject.toml's ``[tool.importlinter]``) cannot check, because it is attribute
access rather than an import: nothing outside driver/session.py touches the JVM side of a session."""

from __future__ import annotations

import ast

from tests.conftest import REPO

PACKAGE = REPO / "spark_mnist"
JVM_ATTRIBUTES = {"sparkContext", "_jvm", "_jsc", "_jdf"}
JVM_HOME = PACKAGE / "driver" / "session.py"


def test_only_session_touches_the_jvm():
    offenders = [
        f"{path.relative_to(REPO)}:{node.lineno} .{node.attr}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != JVM_HOME
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute) and node.attr in JVM_ATTRIBUTES
    ]
    assert offenders == []
