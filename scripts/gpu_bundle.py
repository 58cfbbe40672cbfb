"""``make gpu-bundle``: what ``scripts/gpu_check.py --bundle`` needs on a GPU machine without network, in one folder.

A GPU machine we are lent has Python with torch (a CUDA build), numpy, pyarrow, pandas, pyyaml, tqdm, requests and
pytest, and no package index, Java or pyspark.  This script, run on a machine with the package index, writes
``OUT`` (default ``.gpu-bundle/``):

* ``wheels/``: the project's wheel, and the wheels ``import spark_mnist.cli`` and a torchrun training run need beyond
  that list (:data:`EXTRA`: pydantic and its own dependencies), for the GPU machine's Python (``--python-version``,
  default 3.12; manylinux x86_64), at the versions the lane lock pins (``--lock``);
* ``data/NAME/``: an ingested dataset (Spark, on this machine): ``--dataset``'s four gz IDX files at ``--source``
  (default ``/usr/share/datasets/NAME``) ingested with ``--ingest-python`` (a lane environment with pyspark), or an
  already-ingested dataset copied from ``--data DIR``;
* ``BUNDLE.json``: what it holds, each file with its size.

It fails with one line when the bundle would be over ``--max-mib`` (default 60) MiB.  The bundle is built beside
``OUT`` and moved into place at the end, so a failed run leaves any earlier bundle as it was.

    python scripts/gpu_bundle.py [--out .gpu-bundle] [--python-version 3.12] [--dataset fashion-mnist]
                                 [--source DIR | --data DIR] [--ingest-python .venv/spark40/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LOCK = REPO / "requirements" / "lanes" / "spark40.txt"
DEFAULT_UV = REPO / ".venv" / ".uv" / "bin" / "uv"
# What the GPU machine lacks for `import spark_mnist.cli` (config.py: pydantic) and a torchrun training run.
# typing-extensions comes with torch there; it is carried for a machine whose copy is older than pydantic's floor,
# and scripts/gpu_check.py installs it only then (a distribution the machine has at the same or a newer version is
# never installed over).  typing-inspection is a dependency of pydantic 2.11 and later only.
EXTRA = ("pydantic", "pydantic-core", "annotated-types", "typing-extensions")
PYDANTIC_WITH_TYPING_INSPECTION = (2, 11)
PLATFORM = "manylinux2014_x86_64"
MAX_MIB = 60


def fail(message: str) -> None:
    print(f"gpu-bundle: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def say(message: str) -> None:
    print(f"gpu-bundle: {message}", flush=True)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(lock: Path) -> dict[str, str]:
    """``{canonical name: version}`` of a lane lock's ``name==version`` lines (a local label such as ``+cpu``
    dropped)."""
    pins = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and ";" not in line:
            name, _, version = line.partition("==")
            pins[canonical(name.split("[")[0])] = version.split("+")[0].strip()
    return pins


def requirements(pins: dict[str, str]) -> list[str]:
    """:data:`EXTRA` as requirements pinned to ``pins`` where the lock has them (else unpinned)."""
    names = list(EXTRA)
    pydantic = pins.get("pydantic")
    if pydantic is None or tuple(int(p) for p in re.findall(r"\d+", pydantic)[:2]) >= PYDANTIC_WITH_TYPING_INSPECTION:
        names.append("typing-inspection")
    return [f"{name}=={pins[name]}" if name in pins else name for name in names]


def run(command: list[str], what: str, **kwargs) -> None:
    say("$ " + " ".join(str(c) for c in command))
    result = subprocess.run([str(c) for c in command], cwd=REPO, **kwargs)
    if result.returncode != 0:
        fail(f"{what} failed with exit code {result.returncode}")


def build_project_wheel(wheels: Path, uv: Path) -> None:
    """The project's wheel, with uv where the Makefile installed it, else pip."""
    if uv.exists():
        run([uv, "build", "--quiet", "--wheel", "--out-dir", wheels, REPO], "building the project's wheel (uv)")
    else:
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", wheels, REPO],
            "building the project's wheel (pip)")
    (wheels / ".gitignore").unlink(missing_ok=True)  # uv build's out-dir marker


def download_extra(wheels: Path, reqs: list[str], python_version: str, platform: str) -> None:
    """The extra wheels for the GPU machine's Python: binary only, no dependencies resolved (the list is whole)."""
    run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
         "--python-version", python_version, "--platform", platform, "--implementation", "cp", "--no-deps",
         "--dest", wheels, *reqs], f"downloading {', '.join(reqs)} for Python {python_version}")


def ingest(output: Path, source: Path, dataset: str, ingest_python: str, timeout_s: float) -> None:
    """``spark-mnist ingest`` of ``source`` into ``output`` with a Spark-capable Python (local[2])."""
    if not source.is_dir():
        fail(f"no dataset source at {source}: put the four gz IDX files of {dataset} there (spark-mnist download "
             f"{dataset} --to DIR, or apt-get install dataset-fashion-mnist), or pass --source DIR or --data DIR")
    command = [ingest_python, "-m", "spark_mnist.cli", "ingest", "--source", str(source), "--output", str(output),
               "--dataset", dataset, "--config", str(REPO / "conf" / "local.yaml")]
    try:
        run(command, f"ingesting {source}", timeout=timeout_s)
    except subprocess.TimeoutExpired:
        fail(f"ingesting {source} ran past {timeout_s:g} s and was stopped")


def copy_dataset(source: Path, output: Path) -> None:
    """An ingested dataset (``_manifest.json`` and the generation it names) copied into the bundle."""
    if not (source / "_manifest.json").is_file():
        fail(f"--data {source}: not an ingested dataset (no _manifest.json); ingest it first (spark-mnist ingest)")
    shutil.copytree(source, output, ignore=shutil.ignore_patterns("_staging*", "*.tmp", ".*"))


def contents(root: Path) -> list[dict]:
    return [{"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a folder for scripts/gpu_check.py --bundle on an offline GPU machine")
    parser.add_argument("--out", default=str(REPO / ".gpu-bundle"), help="the bundle folder (replaced)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python, e.g. 3.12 or 3.11")
    parser.add_argument("--platform", default=PLATFORM, help=f"pip's --platform (default: {PLATFORM})")
    parser.add_argument("--dataset", default="fashion-mnist", help="registry name of the dataset")
    parser.add_argument("--source", help="its four gz IDX files (default: /usr/share/datasets/DATASET)")
    parser.add_argument("--data", help="an already-ingested dataset to copy instead of ingesting (no Spark)")
    parser.add_argument("--ingest-python", default=str(REPO / ".venv" / "spark40" / "bin" / "python"),
                        help="a Python with pyspark and the package, for the ingest (default: lane spark40's)")
    parser.add_argument("--lock", default=str(DEFAULT_LOCK), help="the lane lock whose versions the wheels take")
    parser.add_argument("--uv", default=str(DEFAULT_UV), help="uv, to build the project's wheel (else pip wheel)")
    parser.add_argument("--max-mib", type=float, default=MAX_MIB, help=f"size limit (default: {MAX_MIB} MiB)")
    parser.add_argument("--ingest-timeout", type=float, default=900, help="seconds the ingest may run")
    args = parser.parse_args(argv)
    if args.data and args.source:
        parser.error("--data (an ingested dataset) and --source (gz IDX files to ingest) exclude each other")
    started = time.perf_counter()
    out = Path(args.out).resolve()
    building = out.with_name(f"{out.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    wheels, data = building / "wheels", building / "data" / args.dataset
    wheels.mkdir(parents=True)
    data.parent.mkdir(parents=True)
    try:
        reqs = requirements(lock_pins(Path(args.lock)))
        build_project_wheel(wheels, Path(args.uv))
        download_extra(wheels, reqs, args.python_version, args.platform)
        if args.data:
            copy_dataset(Path(args.data), data)
        else:
            source = Path(args.source or f"/usr/share/datasets/{args.dataset}")
            ingest(data, source, args.dataset, args.ingest_python, args.ingest_timeout)
        files = contents(building)
        total = sum(f["bytes"] for f in files)
        limit = int(args.max_mib * 2**20)
        if total > limit:
            biggest = ", ".join(f"{f['path']} {f['bytes'] / 2**20:.1f} MiB"
                                for f in sorted(files, key=lambda f: -f["bytes"])[:3])
            fail(f"the bundle would be {total / 2**20:.1f} MiB, over the {args.max_mib:g} MiB limit (--max-mib); "
                 f"largest: {biggest}")
        bundle = {"python_version": args.python_version, "platform": args.platform, "dataset": args.dataset,
                  "data": f"data/{args.dataset}", "requirements": reqs,
                  "wheels": sorted(p.name for p in wheels.glob("*.whl")),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "total_bytes": total, "total_mib": round(total / 2**20, 2), "files": files}
        (building / "BUNDLE.json").write_text(json.dumps(bundle, indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        building.rename(out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    say(f"{out}: {total / 2**20:.1f} MiB ({len(files)} files, {len(bundle['wheels'])} wheels, dataset "
        f"{args.dataset}) in {time.perf_counter() - started:.0f} s; on the GPU machine: "
        f"python3 scripts/gpu_check.py --bundle {os.path.relpath(out, REPO) if out.is_relative_to(REPO) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
