"""The install lines the docs show name extras that exist and bring what their recipe needs: every
``spark_mnist-….whl[...]`` or ``spark-mnist[...]`` of README, docs/ and the example notebooks names extras of the
package (whose metadata in the built wheel ``tests/test_packaging.py`` compares with ``pyproject.toml``); the
Databricks Connect recipe brings torch and no pyspark (databricks-connect replaces it); the Spark Connect recipe
brings torch and pyspark's Connect client; README's table of extras lists every extra a user installs.  No
install runs here: ``make test-kit`` installs the wheel with the local extras into a fresh environment."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "examples").rglob("*.py"))]
EXTRAS_OF_A_LINE = re.compile(r"(?:spark_mnist-[\w.\-]*\.whl|spark-mnist)\[([\w,\- ]+)\]")
CONNECT_PAGE = REPO / "docs" / "how-to" / "databricks-connect.md"


def optional_dependencies() -> dict[str, list[Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {extra: [Requirement(r) for r in reqs] for extra, reqs in project["optional-dependencies"].items()}


def brought(extras: list[str]) -> dict[str, Requirement]:
    """The requirements ``pip install 'wheel[extras]'`` adds to the package's own, by canonical name."""
    table = optional_dependencies()
    return {canonicalize_name(r.name): r for extra in extras for r in table[extra]}


def install_lines() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        if "_build" in page.parts:
            continue
        for line in page.read_text(encoding="utf-8").splitlines():
            for match in EXTRAS_OF_A_LINE.finditer(line):
                found.append((f"{page.relative_to(REPO)}: {line.strip()}",
                              [e.strip() for e in match.group(1).split(",")]))
    return found


def connect_install_line(marker: str) -> list[str]:
    """The extras of the first ``pip install`` line of the Databricks Connect page that contains ``marker``."""
    for line in CONNECT_PAGE.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("pip install") and marker in line:
            (match,) = EXTRAS_OF_A_LINE.finditer(line)
            return [e.strip() for e in match.group(1).split(",")]
    raise AssertionError(f"{CONNECT_PAGE.name}: no pip install line with {marker!r}")


def test_the_docs_show_install_lines():
    pages = {where.split(":", 1)[0] for where, _ in install_lines()}
    assert {"README.md", "docs/how-to/databricks-connect.md", "docs/how-to/testing.md"} <= pages


@pytest.mark.parametrize("where, extras", install_lines(), ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_every_install_line_names_extras_the_package_has(where, extras):
    assert set(extras) <= optional_dependencies().keys(), f"{where}: no such extra"


def test_the_databricks_connect_recipe_brings_torch_and_no_pyspark():
    extras = connect_install_line("databricks-connect==")
    adds = brought(extras)
    assert "torch" in adds, "training needs torch: the recipe must name the torch extra"
    assert "pyspark" not in adds, "databricks-connect replaces pyspark: the recipe must not install it"


def test_the_spark_connect_recipe_brings_torch_and_pysparks_connect_client():
    extras = connect_install_line("[connect")
    adds = brought(extras)
    assert "torch" in adds
    assert "connect" in adds["pyspark"].extras and adds["pyspark"].specifier.contains("4.0.0")


def test_readme_lists_every_extra_a_user_installs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `([\w-]+)` \|", readme, flags=re.M))
    assert listed == optional_dependencies().keys() - {"dev"}
