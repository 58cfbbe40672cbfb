"""Print uv's options for the package sources pip is configured with on this machine (``pip config list``: index-url,
extra-index-url, find-links, from pip's files and PIP_* variables), so ``uv pip`` takes the same wheels and indexes
pip takes.  uv reads no pip configuration of its own.  Used by the Makefile."""

from __future__ import annotations

import ast
import shlex
import subprocess
import sys

# pip's key -> uv's option.  pip picks the best version across all indexes; so does uv's unsafe-best-match.
OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links"}


def main() -> None:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    values: dict[str, list[str]] = {}
    for line in listed.splitlines():  # e.g. global.find-links='/opt/wheels' or :env:.find-links='/opt/wheels'
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in OPTIONS and value:
            for item in ast.literal_eval(value).split():
                values.setdefault(name, [])
                if item not in values[name]:
                    values[name].append(item)
    args = ["--index-strategy", "unsafe-best-match"]
    for name, items in values.items():
        if name == "index-url":
            items = items[:1]
        args += [part for item in items for part in (OPTIONS[name], item)]
    print(shlex.join(args))


if __name__ == "__main__":
    main()
