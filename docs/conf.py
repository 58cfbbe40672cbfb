"""Sphinx configuration of the spark-mnist documentation (``make docs``; docs/README.md says why these tools)."""

from __future__ import annotations

import importlib.metadata

project = "spark-mnist"
author = "the spark-mnist authors"
copyright = "2026, the spark-mnist authors"  # noqa: A001 - Sphinx's own setting name
release = importlib.metadata.version("spark-mnist")
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinxarg.ext",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "README.md", "images", "reference/_*.md"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# Every reference must resolve (make docs runs sphinx-build -W -n): no network, so no intersphinx.
nitpicky = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"spark-mnist {release}"

# References to other projects' objects (no intersphinx: no network), and names the docstrings use as plain words.
nitpick_ignore_regex = [
    (r"py:.*", r"(os|pathlib|typing|collections|contextlib|logging|argparse|multiprocessing|concurrent|io)(\..*)?"),
    (r"py:.*", r"(numpy|np|torch|pyarrow|pa|pyspark|pandas|pd|pytest|_pytest|mlflow|petastorm|pydantic)(\..*)?"),
]


def _generated_tables() -> None:
    """Write reference/_settings.md and reference/_datasets.md from the code (git-ignored; built each time)."""
    import pathlib

    from spark_mnist.config import SECTIONS, Settings
    from spark_mnist.datasets import registry

    here = pathlib.Path(__file__).parent / "reference"
    rows = ["| setting | option | default | what it is |", "|---|---|---|---|"]
    for section in SECTIONS:
        for name, field in Settings.__fields__[section].type_.__fields__.items():
            option = f"`--{name.replace('_', '-')}`" if field.field_info.extra.get("cli", True) else "file only"
            default = "null" if field.default is None else repr(field.default)
            help_text = (field.field_info.description or "").replace("|", "\\|")
            rows.append(f"| `{section}.{name}` | {option} | `{default}` | {help_text} |")
    (here / "_settings.md").write_text("\n".join(rows) + "\n", encoding="utf-8")
    rows = ["| name | classes | image shape | train / test rows | torchvision folder |", "|---|---|---|---|---|"]
    for name, spec in registry().items():
        sizes = " / ".join(f"{spec.split_sizes[s]:,}" for s in ("train", "test") if s in spec.split_sizes) or "-"
        rows.append(f"| `{name}` | {spec.num_classes} | {spec.image_shape[0]}×{spec.image_shape[1]} | {sizes} | "
                    f"{spec.torchvision_folder or '-'} |")
    (here / "_datasets.md").write_text("\n".join(rows) + "\n", encoding="utf-8")


_generated_tables()


def _in_code(target: str, module: str | None, cls: str | None) -> bool:
    """Whether ``target`` names a real object of the code, as written or relative to the module and class the
    reference sits in."""
    import importlib

    prefixes = [f"{module}.{cls}" if module and cls else "", module or "", ""]
    for prefix in dict.fromkeys(prefixes):
        parts = f"{prefix}.{target}".lstrip(".").split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for name in parts[cut:]:
                    obj = getattr(obj, name) if hasattr(obj, name) else obj.__annotations__[name]
            except (AttributeError, KeyError):
                break
            return True
    return False


def _resolve(app, env, node, contnode):
    """A reference the python domain did not resolve: an unqualified name (``InputError`` in a ``Raises:``
    section) links to the one documented object of that name; a name of the code that no page documents (an
    internal module, function or constant) is shown as code, not a link.  Anything else stays a warning."""
    from sphinx.util.nodes import make_refnode

    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    objects = env.get_domain("py").objects
    matches = [name for name in objects if name == target or name.endswith("." + target)]
    if len(matches) == 1:
        found = objects[matches[0]]
        return make_refnode(app.builder, node["refdoc"], found.docname, found.node_id, contnode, matches[0])
    if _in_code(target, node.get("py:module"), node.get("py:class")):
        return contnode
    return None


def setup(app):
    app.connect("missing-reference", _resolve)
