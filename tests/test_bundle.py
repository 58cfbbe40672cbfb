"""databricks.yml, the Databricks Asset Bundle: checked here so that a typo fails in the test suite, not on a cluster.

The bundle's ``${var.X}`` references are replaced by the variables' defaults and ``${workspace.*}`` /
``${bundle.*}`` by dummy strings; then every job is validated key by key against ``databricks-sdk``'s
``JobSettings`` dataclasses (``JobSettings.from_dict`` alone ignores unknown keys and bad enum values), where each
task runs is checked (:func:`placement_errors`: on serverless through one of the job's environments and with no
cluster or library, or on one of its job clusters; the ingest on serverless with the wheel in its environment's
dependencies, the training on a dedicated GPU job cluster with the wheel as a library), and the task parameters are
parsed with the real ``spark-mnist`` argument parser.  No Spark, no network.
"""

from __future__ import annotations

import argparse
import os
import copy
import dataclasses
import enum
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from spark_mnist.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
BUNDLE_FILE = REPO / "databricks.yml"
JOB = "spark_mnist"
WHEEL = "./dist/*.whl"  # what the artifact builds (pip wheel -w dist), as the tasks install it

REFERENCE = re.compile(r"\$\{([A-Za-z0-9_.\-\[\]]+)\}")
DUMMY = {"workspace": "/Workspace/Users/someone@example.com/.bundle/spark-mnist/dev", "bundle": "spark-mnist-dev"}
FILE_PATH = DUMMY["workspace"] + "/files"

# Top-level and per-target mappings of the bundle schema that this repository may use.
BUNDLE_KEYS = {"bundle", "artifacts", "variables", "resources", "targets", "include", "workspace", "sync",
               "permissions", "run_as", "presets", "experimental"}
TARGET_KEYS = {"mode", "default", "workspace", "variables", "resources", "presets", "run_as", "permissions",
               "artifacts", "sync", "git", "bundle", "cluster_id", "compute_id"}
VARIABLE_KEYS = {"description", "default", "type", "lookup"}
ARTIFACT_KEYS = {"type", "build", "path", "files", "executable", "dynamic_version"}
# Keys a bundle's job resource may hold beyond the Jobs API's JobSettings.
BUNDLE_JOB_KEYS = {"permissions"}


# --- loading and substitution ---------------------------------------------------------------------------------

def load_bundle(path: Path = BUNDLE_FILE) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict), f"{path.name}: expected a mapping"
    return data


def variable_defaults(bundle: dict[str, Any]) -> dict[str, Any]:
    return {name: spec["default"] for name, spec in (bundle.get("variables") or {}).items()
            if isinstance(spec, dict) and "default" in spec}


def _resolve(reference: str, defaults: dict[str, Any]) -> Any:
    if reference.startswith("var."):
        name = reference[len("var."):]
        if name not in defaults:
            raise KeyError(f"${{{reference}}}: no such variable, or it has no default")
        return defaults[name]
    if reference == "workspace.file_path":
        return FILE_PATH
    head = reference.split(".", 1)[0]
    if head in DUMMY:
        return f"{DUMMY[head]}/{reference}"
    raise KeyError(f"${{{reference}}}: unknown reference (expected var., workspace. or bundle.)")


def substitute(value: Any, defaults: dict[str, Any]) -> Any:
    """Replace ``${...}`` references everywhere.  A string that is one reference takes the value itself (so
    ``num_workers: ${var.num_processes}`` stays an int, as in the CLI); inside a longer string it is formatted."""
    if isinstance(value, dict):
        return {k: substitute(v, defaults) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, defaults) for v in value]
    if isinstance(value, str):
        whole = REFERENCE.fullmatch(value)
        if whole:
            return _resolve(whole.group(1), defaults)
        return REFERENCE.sub(lambda m: str(_resolve(m.group(1), defaults)), value)
    return value


def resolved_bundle(bundle: dict[str, Any] | None = None) -> dict[str, Any]:
    bundle = load_bundle() if bundle is None else bundle
    return substitute(bundle, variable_defaults(bundle))


def references(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set().union(*(references(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(references(v) for v in value)) if value else set()
    return set(REFERENCE.findall(value)) if isinstance(value, str) else set()


# --- strict validation against the SDK's dataclasses ----------------------------------------------------------

def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _check_scalar(tp: type, value: Any, path: str) -> list[str]:
    """The CLI's normalisation: strings accept numbers and booleans, numbers and booleans accept their spelling."""
    if tp is str:
        ok = isinstance(value, (str, int, float))
    elif tp is bool:
        ok = isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false"))
    elif tp is int:
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value) is not None)
    elif tp is float:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
            isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value) is not None)
    else:
        return []
    return [] if ok else [f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}"]


def validate(value: Any, tp: Any, path: str, *, partial: bool = False, extra_keys: frozenset = frozenset()
             ) -> list[str]:
    """Every problem of ``value`` against the type ``tp`` (an SDK dataclass, Enum, List, Dict or scalar), each
    naming its path, e.g. ``resources.jobs.spark_mnist.tasks[1].spark_python_task.pyton_file: unknown key``.
    ``partial`` skips the required-field check (target overrides); ``extra_keys`` are allowed at this level only."""
    tp = _unwrap_optional(tp)
    if value is None:
        return []
    origin = typing.get_origin(tp)
    if origin in (list, typing.List):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        (item,) = typing.get_args(tp) or (Any,)
        return [e for i, v in enumerate(value) for e in validate(v, item, f"{path}[{i}]", partial=partial)]
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping, got {type(value).__name__}"]
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return [e for k, v in value.items() for e in (_check_scalar(key_tp, k, f"{path}.{k} (key)")
                                                      + validate(v, val_tp, f"{path}.{k}", partial=partial))]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        return [] if value in allowed else [f"{path}: bad value {value!r} for {tp.__name__} (one of {allowed})"]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping ({tp.__name__}), got {type(value).__name__}"]
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        errors = [f"{path}.{k}: unknown key" for k in value if k not in fields and k not in extra_keys]
        if not partial:
            errors += [f"{path}.{name}: missing required key" for name, f in fields.items()
                       if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                       and name not in value]
        for k, v in value.items():
            if k in fields:
                errors += validate(v, hints[k], f"{path}.{k}", partial=partial)
        return errors
    if tp is Any:
        return []
    return _check_scalar(tp, value, path)


def job_errors(bundle: dict[str, Any]) -> list[str]:
    """Problems of every job of the bundle and of every target's job overrides, after substitution."""
    from databricks.sdk.service.jobs import JobSettings

    resolved = resolved_bundle(bundle)
    errors = []
    sections = [("resources", resolved.get("resources") or {}, False)]
    for target, spec in (resolved.get("targets") or {}).items():
        sections.append((f"targets.{target}.resources", (spec or {}).get("resources") or {}, True))
    for prefix, resources, partial in sections:
        for name, job in (resources.get("jobs") or {}).items():
            errors += validate(job, JobSettings, f"{prefix}.jobs.{name}", partial=partial,
                               extra_keys=frozenset(BUNDLE_JOB_KEYS))
    return errors


# --- helpers for the structural checks ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle() -> dict[str, Any]:
    return load_bundle()


@pytest.fixture(scope="module")
def job(bundle) -> dict[str, Any]:
    return resolved_bundle(bundle)["resources"]["jobs"][JOB]


def tasks_by_key(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["task_key"]: t for t in job["tasks"]}


def clusters_by_key(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["job_cluster_key"]: c["new_cluster"] for c in job.get("job_clusters") or []}


def environments_by_key(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["environment_key"]: e.get("spec") or {} for e in job.get("environments") or []}


# The keys that put a task on classic compute; a task with none of them and an environment_key runs on serverless.
CLUSTER_KEYS = ("job_cluster_key", "existing_cluster_id", "new_cluster")


def placement_errors(job: dict[str, Any], path: str = f"resources.jobs.{JOB}") -> list[str]:
    """Where each task runs, beyond the types: a task runs either on serverless compute (``environment_key``, one
    of the job's ``environments``, and no ``libraries``: a serverless task installs what its environment's
    ``dependencies`` list) or on exactly one cluster (a job cluster of ``job_clusters``); every environment and
    job cluster is used, and each key is defined once."""
    errors = []
    environments = [e.get("environment_key") for e in job.get("environments") or []]
    clusters = [c.get("job_cluster_key") for c in job.get("job_clusters") or []]
    for kind, keys in (("environments", environments), ("job_clusters", clusters)):
        errors += [f"{path}.{kind}: {key!r} defined more than once" for key in sorted(
            {k for k in keys if keys.count(k) > 1})]
    used_environments, used_clusters = set(), set()
    for i, task in enumerate(job.get("tasks") or []):
        where = f"{path}.tasks[{i}] ({task.get('task_key')})"
        on_cluster = [k for k in CLUSTER_KEYS if k in task]
        env = task.get("environment_key")
        if env is not None:
            used_environments.add(env)
            if env not in environments:
                errors.append(f"{where}: environment_key {env!r} is not one of the job's environments {environments}")
            if on_cluster:
                errors.append(f"{where}: both serverless (environment_key) and a cluster ({', '.join(on_cluster)})")
            if "libraries" in task:
                errors.append(f"{where}: libraries on a serverless task (list them in the environment's dependencies)")
        elif not on_cluster:
            errors.append(f"{where}: no compute (environment_key or job_cluster_key)")
        elif len(on_cluster) > 1:
            errors.append(f"{where}: more than one cluster ({', '.join(on_cluster)})")
        if "job_cluster_key" in task:
            used_clusters.add(task["job_cluster_key"])
            if task["job_cluster_key"] not in clusters:
                errors.append(f"{where}: job_cluster_key {task['job_cluster_key']!r} is not one of {clusters}")
    errors += [f"{path}.environments: {key!r} used by no task" for key in environments if key not in used_environments]
    errors += [f"{path}.job_clusters: {key!r} used by no task" for key in clusters if key not in used_clusters]
    return errors


def subcommand_parser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[command]


def parse_task(task: dict[str, Any], command: str) -> argparse.Namespace:
    params = [str(p) for p in task["spark_python_task"]["parameters"]]
    known = set(subcommand_parser(command)._option_string_actions)
    unknown = [p for p in params if p.startswith("--") and p.split("=", 1)[0] not in known]
    # argparse would accept abbreviations (--num-proc); the bundle must spell options out.
    if unknown:
        pytest.fail(f"task {task['task_key']}: not options of `spark-mnist {command}`: {unknown}")
    try:
        return build_parser().parse_args([command, *params])
    except SystemExit as e:  # argparse reports on stderr and exits 2
        pytest.fail(f"task {task['task_key']}: `spark-mnist {command}` rejects {params} (exit {e.code})")


# --- the bundle as a file -------------------------------------------------------------------------------------

def test_bundle_top_level(bundle):
    assert set(bundle) <= BUNDLE_KEYS, f"unknown top-level keys: {sorted(set(bundle) - BUNDLE_KEYS)}"
    assert bundle["bundle"]["name"] == "spark-mnist"
    for name, spec in bundle["variables"].items():
        assert isinstance(spec, dict) and set(spec) <= VARIABLE_KEYS, f"variables.{name}: {spec!r}"
        assert "default" in spec, f"variables.{name}: no default, so every deploy would need --var {name}=..."
    for name, spec in bundle["targets"].items():
        assert set(spec) <= TARGET_KEYS, f"targets.{name}: unknown keys {sorted(set(spec) - TARGET_KEYS)}"
    assert bundle["targets"]["dev"]["mode"] == "development" and bundle["targets"]["dev"]["default"] is True
    assert bundle["targets"]["prod"]["mode"] == "production"


def test_every_reference_resolves_and_every_variable_is_used(bundle):
    refs = references({k: v for k, v in bundle.items() if k != "variables"})
    used = {r[len("var."):] for r in refs if r.startswith("var.")}
    declared = set(bundle["variables"])
    assert used <= declared, f"undeclared variables: {sorted(used - declared)}"
    assert declared <= used, f"variables never used: {sorted(declared - used)}"
    resolved = resolved_bundle(bundle)
    assert not references(resolved), f"left unresolved: {sorted(references(resolved))}"


def test_substitution_keeps_types():
    defaults = {"n": 2, "name": "x"}
    assert substitute({"a": "${var.n}", "b": "p/${var.n}/${var.name}", "c": ["${bundle.target}"]}, defaults) == {
        "a": 2, "b": "p/2/x", "c": [DUMMY["bundle"] + "/bundle.target"]}
    with pytest.raises(KeyError, match="var.nope"):
        substitute("${var.nope}", defaults)
    with pytest.raises(KeyError, match="vars.n"):
        substitute("${vars.n}", defaults)


def test_artifact_builds_the_wheel_the_tasks_install(bundle):
    artifacts = bundle["artifacts"]
    assert len(artifacts) == 1
    (wheel,) = artifacts.values()
    assert set(wheel) <= ARTIFACT_KEYS
    assert wheel["type"] == "whl"
    assert wheel["build"] == "python -m pip wheel --no-deps -w dist ."
    assert (REPO / wheel["path"] / "pyproject.toml").is_file()
    assert WHEEL == f"./{wheel['build'].split(' -w ')[1].split()[0]}/*.whl", "the tasks install what the build writes"


# --- the job against the Jobs API types -----------------------------------------------------------------------

@pytest.mark.one_lane
def test_job_validates_against_sdk_types(bundle):
    pytest.importorskip("databricks.sdk")
    from databricks.sdk.service.jobs import JobSettings

    assert job_errors(bundle) == []
    for name, job in resolved_bundle(bundle)["resources"]["jobs"].items():
        settings = JobSettings.from_dict({k: v for k, v in job.items() if k not in BUNDLE_JOB_KEYS})
        # from_dict then as_dict loses nothing: no key was dropped, no enum value turned into None.
        assert settings.as_dict() == {k: v for k, v in job.items() if k not in BUNDLE_JOB_KEYS}, name
        assert [t.task_key for t in settings.tasks] == ["ingest", "train"]


@pytest.mark.parametrize("mutate, expected", [
    (lambda j: j["tasks"][1]["spark_python_task"].__setitem__(
        "pyton_file", j["tasks"][1]["spark_python_task"].pop("python_file")),
     ["resources.jobs.spark_mnist.tasks[1].spark_python_task.pyton_file: unknown key",
      "resources.jobs.spark_mnist.tasks[1].spark_python_task.python_file: missing required key"]),
    (lambda j: j["job_clusters"][0]["new_cluster"].__setitem__("num_worker", 2),
     ["resources.jobs.spark_mnist.job_clusters[0].new_cluster.num_worker: unknown key"]),
    (lambda j: j["job_clusters"][0]["new_cluster"].__setitem__("data_security_mode", "SINGLE_USR"),
     ["resources.jobs.spark_mnist.job_clusters[0].new_cluster.data_security_mode: bad value 'SINGLE_USR'"]),
    (lambda j: j["tasks"][1].__setitem__("libraries", [{"wheel": "./dist/*.whl"}]),
     ["resources.jobs.spark_mnist.tasks[1].libraries[0].wheel: unknown key"]),
    (lambda j: j["tasks"][1].__setitem__("depends_on", "ingest"),
     ["resources.jobs.spark_mnist.tasks[1].depends_on: expected a list"]),
    (lambda j: j["job_clusters"][0]["new_cluster"].__setitem__("num_workers", "two"),
     ["resources.jobs.spark_mnist.job_clusters[0].new_cluster.num_workers: expected int"]),
    (lambda j: j["environments"][0]["spec"].__setitem__("enviroment_version", "4"),
     ["resources.jobs.spark_mnist.environments[0].spec.enviroment_version: unknown key"]),
    (lambda j: j["environments"][0].__setitem__("spec", {"dependencies": "./dist/*.whl"}),
     ["resources.jobs.spark_mnist.environments[0].spec.dependencies: expected a list"]),
    (lambda j: j["tasks"][0].__setitem__("enviroment_key", j["tasks"][0].pop("environment_key")),
     ["resources.jobs.spark_mnist.tasks[0].enviroment_key: unknown key"]),
    (lambda j: j.__setitem__("max_concurent_runs", 1),
     ["resources.jobs.spark_mnist.max_concurent_runs: unknown key"]),
])
def test_a_typo_is_caught(bundle, mutate, expected):
    pytest.importorskip("databricks.sdk")
    broken = copy.deepcopy(bundle)
    mutate(broken["resources"]["jobs"][JOB])
    errors = job_errors(broken)
    assert len(errors) == len(expected), errors
    for error, start in zip(sorted(errors), sorted(expected)):
        assert error.startswith(start), errors


def test_a_typo_in_a_target_override_is_caught(bundle):
    pytest.importorskip("databricks.sdk")
    broken = copy.deepcopy(bundle)
    broken["targets"]["prod"]["resources"] = {"jobs": {JOB: {"job_clusters": [
        {"job_cluster_key": "gpu", "new_cluster": {"num_workers": 4, "node_typ_id": "g5.12xlarge"}}]}}}
    assert job_errors(broken) == [
        "targets.prod.resources.jobs.spark_mnist.job_clusters[0].new_cluster.node_typ_id: unknown key"]


# --- the job's structure --------------------------------------------------------------------------------------

def test_two_tasks_train_after_ingest(job):
    tasks = tasks_by_key(job)
    assert list(tasks) == ["ingest", "train"]
    assert "depends_on" not in tasks["ingest"]
    assert tasks["train"]["depends_on"] == [{"task_key": "ingest"}]


def test_every_task_runs_on_serverless_or_one_defined_cluster(job):
    assert placement_errors(job) == []


def test_ingest_runs_on_serverless_with_the_wheel(job):
    ingest = tasks_by_key(job)["ingest"]
    assert not any(k in ingest for k in CLUSTER_KEYS), "serverless: no cluster on the ingest task"
    assert "libraries" not in ingest, "serverless: the wheel comes from the environment's dependencies"
    spec = environments_by_key(job)[ingest["environment_key"]]
    assert WHEEL in spec["dependencies"]
    # environment_version, not the deprecated ``client``; a version with Python 3.12 and Databricks Connect >= 17
    assert "client" not in spec and str(spec["environment_version"]) in ("4", "5")


def test_train_runs_on_a_dedicated_gpu_job_cluster_with_the_wheel(job):
    train_task = tasks_by_key(job)["train"]
    assert "environment_key" not in train_task
    assert {"whl": WHEEL} in train_task["libraries"]
    gpu = clusters_by_key(job)[train_task["job_cluster_key"]]
    assert "-gpu-ml-" in gpu["spark_version"], "TorchDistributor needs Databricks Runtime ML"
    assert gpu["data_security_mode"] == "SINGLE_USER", "dedicated access mode: standard mode has no ML runtime"
    assert gpu["spark_conf"]["spark.task.resource.gpu.amount"] == "1"
    train = parse_task(train_task, "train")
    assert gpu["num_workers"] == train.num_processes, "one rank per one-GPU worker"


@pytest.mark.parametrize("mutate, expected", [
    (lambda j: j["tasks"][0].__setitem__("job_cluster_key", "gpu"),
     ["tasks[0] (ingest): both serverless (environment_key) and a cluster (job_cluster_key)"]),
    (lambda j: j["tasks"][0].__setitem__("libraries", [{"whl": WHEEL}]),
     ["tasks[0] (ingest): libraries on a serverless task"]),
    (lambda j: j["tasks"][0].__setitem__("environment_key", "default"),
     ["tasks[0] (ingest): environment_key 'default' is not one of the job's environments",
      "environments: 'serverless' used by no task"]),
    (lambda j: j.pop("environments"),
     ["tasks[0] (ingest): environment_key 'serverless' is not one of the job's environments []"]),
    (lambda j: j["tasks"][0].pop("environment_key"),
     ["tasks[0] (ingest): no compute", "environments: 'serverless' used by no task"]),
    (lambda j: j["tasks"][1].__setitem__("existing_cluster_id", "0123-456789-abcdef"),
     ["tasks[1] (train): more than one cluster (job_cluster_key, existing_cluster_id)"]),
    (lambda j: j["tasks"][1].__setitem__("job_cluster_key", "cpu"),
     ["tasks[1] (train): job_cluster_key 'cpu' is not one of ['gpu']", "job_clusters: 'gpu' used by no task"]),
    (lambda j: j["environments"].append(copy.deepcopy(j["environments"][0])),
     ["environments: 'serverless' defined more than once"]),
])
def test_a_misplaced_task_is_caught(job, mutate, expected):
    broken = copy.deepcopy(job)
    mutate(broken)
    errors = placement_errors(broken)
    assert len(errors) == len(expected), errors
    for error, start in zip(sorted(errors), sorted(expected)):
        assert error.startswith(f"resources.jobs.{JOB}.{start}"), errors


def test_python_files_exist(job):
    assert [t["spark_python_task"]["python_file"] for t in job["tasks"]] == ["./jobs/ingest.py", "./jobs/train.py"]
    for task in job["tasks"]:
        assert (REPO / task["spark_python_task"]["python_file"]).is_file()


def test_task_parameters_are_cli_options(job):
    tasks = tasks_by_key(job)
    ingest = parse_task(tasks["ingest"], "ingest")
    train = parse_task(tasks["train"], "train")
    assert ingest.config == train.config == f"{FILE_PATH}/conf/databricks.yaml"
    assert ingest.source.startswith("/Volumes/") and ingest.output.startswith("/Volumes/")
    assert train.data == ingest.output, "train reads what ingest wrote"
    assert train.use_gpu is True and train.local_mode is False
    assert train.epochs >= 1 and train.num_processes >= 1


def test_unknown_or_abbreviated_option_is_refused(job):
    task = copy.deepcopy(tasks_by_key(job)["train"])
    task["spark_python_task"]["parameters"] += ["--num-proc", "2"]
    with pytest.raises(pytest.fail.Exception, match="--num-proc"):
        parse_task(task, "train")
    task = copy.deepcopy(tasks_by_key(job)["ingest"])
    task["spark_python_task"]["parameters"] += ["--epochs", "2"]
    with pytest.raises(pytest.fail.Exception, match="--epochs"):
        parse_task(task, "ingest")


def test_parameters_and_cluster_config_make_valid_settings(job):
    """The task parameters on top of conf/databricks.yaml (the repository's copy) pass the settings' validation."""
    from spark_mnist.cli import settings_from_args

    tasks = tasks_by_key(job)
    for command in ("ingest", "train"):
        args = parse_task(tasks[command], command)
        args.config = str(REPO / "conf" / "databricks.yaml")
        settings = settings_from_args(args)
        if command == "ingest":
            assert settings.ingest.output == args.output and settings.ingest.dataset == args.dataset
        else:
            assert settings.train.use_gpu is True and settings.train.local_mode is False
            assert settings.train.num_processes == args.num_processes and settings.train.data == args.data


def test_manual_job_json_in_docs_matches(job):
    """docs/databricks-bundle.md's hand-written Jobs API JSON: valid, and the same clusters and parameters."""
    import json

    text = (REPO / "docs" / "databricks-bundle.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```json\n(.*?)```", text, flags=re.S)
    manual = json.loads(block)
    try:
        from databricks.sdk.service.jobs import JobSettings
    except ImportError:  # without databricks-sdk: the structural checks below only
        JobSettings = None
    if JobSettings is not None:
        assert validate(manual, JobSettings, "docs.job") == []
    assert placement_errors(manual, "docs.job") == []
    assert clusters_by_key(manual) == clusters_by_key(job)
    # the same environments, but the wheel from where the manual steps upload it
    def without_dependencies(j):
        return {key: {k: v for k, v in spec.items() if k != "dependencies"}
                for key, spec in environments_by_key(j).items()}

    assert without_dependencies(manual) == without_dependencies(job)
    for key, spec in environments_by_key(manual).items():
        assert [d for d in spec["dependencies"] if d.endswith(".whl")], key
    for key, task in tasks_by_key(manual).items():
        bundled = tasks_by_key(job)[key]
        assert parse_task(task, key).__dict__ == {**vars(parse_task(bundled, key)), "config": None}, key
        assert task.get("depends_on") == bundled.get("depends_on"), key
        assert {k: task.get(k) for k in ("environment_key", *CLUSTER_KEYS)} == {
            k: bundled.get(k) for k in ("environment_key", *CLUSTER_KEYS)}, key


# --- runtime and storage --------------------------------------------------------------------------------------

CONF_FILE = REPO / "conf" / "databricks.yaml"
# The Databricks Runtime ML versions the bundle is meant to deploy on: (runtime, scala) variable values.
RUNTIMES = [("15.4.x", "2.12"), ("16.4.x", "2.13"), ("17.3.x", "2.13"), ("18.x", "2.13")]
# DBFS, in any spelling a path or URI may take: workspaces created without a DBFS root have none of it.
DBFS = re.compile(r"^(dbfs:|(file:(//)?)?/dbfs(/|$))", re.IGNORECASE)


def strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def volume_root(bundle: dict[str, Any]) -> str:
    defaults = variable_defaults(bundle)
    return f"/Volumes/{defaults['catalog']}/{defaults['schema']}/{defaults['volume']}/"


def test_default_runtime_is_17_3_lts_ml(job):
    assert clusters_by_key(job)["gpu"]["spark_version"] == "17.3.x-gpu-ml-scala2.13"


@pytest.mark.parametrize("runtime, scala", RUNTIMES)
def test_runtime_is_a_variable_of_the_gpu_cluster(bundle, runtime, scala):
    raw = clusters_by_key(bundle["resources"]["jobs"][JOB])
    assert {"var.runtime", "var.scala"} <= references(raw["gpu"]["spark_version"])
    defaults = {**variable_defaults(bundle), "runtime": runtime, "scala": scala}
    clusters = clusters_by_key(substitute(bundle, defaults)["resources"]["jobs"][JOB])
    assert clusters["gpu"]["spark_version"] == f"{runtime}-gpu-ml-scala{scala}"


@pytest.mark.parametrize("version", ["4", "5"])
def test_serverless_environment_version_is_a_variable(bundle, version):
    raw = environments_by_key(bundle["resources"]["jobs"][JOB])["serverless"]
    assert references(raw["environment_version"]) == {"var.serverless_env"}
    defaults = {**variable_defaults(bundle), "serverless_env": version}
    spec = environments_by_key(substitute(bundle, defaults)["resources"]["jobs"][JOB])["serverless"]
    assert spec["environment_version"] == version


def test_dbfs_pattern():
    for path in ("/dbfs", "/dbfs/tmp/x", "dbfs:/tmp/x", "DBFS:/x", "file:/dbfs/x", "file:///dbfs/tmp/x"):
        assert DBFS.match(path), path
    for path in ("/Volumes/main/default/mnist", "file:///Volumes/main/default/mnist/x", "/dbfsx", "raw/dbfs"):
        assert not DBFS.match(path), path


def test_no_path_on_dbfs(bundle):
    with open(CONF_FILE, encoding="utf-8") as f:
        conf = yaml.safe_load(f)
    for name, data in (("databricks.yml", resolved_bundle(bundle)), ("conf/databricks.yaml", conf)):
        on_dbfs = [s for s in strings(data) if DBFS.match(s.strip())]
        assert on_dbfs == [], f"{name}: {on_dbfs}"


def test_every_path_written_is_in_the_volume(bundle, job):
    """The bundle's task paths and conf/databricks.yaml's paths (those of the bundle's default volume) agree."""
    root = volume_root(bundle)
    tasks = tasks_by_key(job)
    ingest = parse_task(tasks["ingest"], "ingest")
    train = parse_task(tasks["train"], "train")
    for path in (ingest.source, ingest.output, train.data, train.run_dir):
        assert path.startswith(root), path
    with open(CONF_FILE, encoding="utf-8") as f:
        conf = yaml.safe_load(f)
    assert conf["ingest"]["source"] == ingest.source and conf["ingest"]["output"] == ingest.output
    assert conf["train"]["run_dir"] == train.run_dir
    assert conf["train"]["data"] in (None, train.data)
    cache = conf["train"]["petastorm_cache_url"]
    assert cache.startswith("file://" + root), cache


# --- the serverless GPU job (Databricks AI Runtime) -----------------------------------------------------------

GPU_JOB = "spark_mnist_serverless_gpu"
GPU_CONF = REPO / "conf" / "serverless-gpu.yaml"
GPU_COMMAND = REPO / "jobs" / "serverless_gpu_train.sh"


@pytest.fixture(scope="module")
def gpu_job(bundle) -> dict[str, Any]:
    return resolved_bundle(bundle)["resources"]["jobs"][GPU_JOB]


def bundles_jobs():
    return pytest.importorskip("databricks.bundles.jobs", reason="databricks-bundles not installed")


@pytest.mark.one_lane
def test_serverless_gpu_job_validates_against_databricks_bundles_types(gpu_job):
    """databricks-bundles' own (strict) types: an unknown key or a bad enum value raises in from_dict."""
    jobs = bundles_jobs()
    job = jobs.Job.from_dict(gpu_job)
    train = next(t for t in job.tasks if t.task_key == "train")
    assert isinstance(train.ai_runtime_task, jobs.AiRuntimeTask)
    (deployment,) = train.ai_runtime_task.deployments  # exactly one deployment in the Preview
    assert isinstance(deployment, jobs.DeploymentSpec)
    assert isinstance(deployment.compute.accelerator_type, jobs.ComputeSpecAcceleratorType)
    assert deployment.compute.accelerator_count >= 1


def test_our_accelerator_types_are_the_bundles(gpu_job):
    from spark_mnist.config import ACCELERATOR_TYPES

    jobs = bundles_jobs()
    assert tuple(t.value for t in jobs.ComputeSpecAcceleratorType) == ACCELERATOR_TYPES


@pytest.mark.parametrize("mutate, match", [
    (lambda t: t["ai_runtime_task"].__setitem__("deployment", t["ai_runtime_task"].pop("deployments")),
     "Unexpected field 'deployment'"),
    (lambda t: t["ai_runtime_task"]["deployments"][0]["compute"].__setitem__("accelerator_type", "GPU_8xH200"),
     "'GPU_8xH200' is not a valid ComputeSpecAcceleratorType"),
    (lambda t: t["ai_runtime_task"]["deployments"][0].__setitem__("command", "spark-mnist train"),
     "Unexpected field 'command'"),
])
def test_a_typo_in_the_ai_runtime_task_is_caught(gpu_job, mutate, match):
    jobs = bundles_jobs()
    broken = copy.deepcopy(gpu_job)
    mutate(tasks_by_key(broken)["train"])
    with pytest.raises(ValueError, match=match):
        jobs.Job.from_dict(broken)


def test_serverless_gpu_job_ingests_on_serverless_cpu_then_trains_on_gpu(gpu_job):
    assert placement_errors(gpu_job, f"resources.jobs.{GPU_JOB}") == []
    tasks = tasks_by_key(gpu_job)
    assert list(tasks) == ["ingest", "train"] and tasks["train"]["depends_on"] == [{"task_key": "ingest"}]
    ingest = parse_task(tasks["ingest"], "ingest")
    assert ingest.config == f"{FILE_PATH}/conf/serverless-gpu.yaml"
    for key in ("ingest", "train"):
        assert WHEEL in environments_by_key(gpu_job)[tasks[key]["environment_key"]]["dependencies"], key
    assert tasks["train"]["max_retries"] >= 1, "a retried task continues from the checkpoint (auto_resume)"


@pytest.mark.parametrize("accelerator_type, count", [("GPU_1xA10", 1), ("GPU_1xH100", 1), ("GPU_8xH100", 8),
                                                     ("GPU_8xB300", 8)])
def test_accelerator_type_and_count_are_variables_on_one_node(bundle, accelerator_type, count):
    raw = tasks_by_key(bundle["resources"]["jobs"][GPU_JOB])["train"]["ai_runtime_task"]["deployments"][0]
    assert references(raw["compute"]) == {"var.accelerator_type", "var.accelerator_count"}
    defaults = {**variable_defaults(bundle), "accelerator_type": accelerator_type, "accelerator_count": count}
    job = substitute(bundle, defaults)["resources"]["jobs"][GPU_JOB]
    compute = tasks_by_key(job)["train"]["ai_runtime_task"]["deployments"][0]["compute"]
    assert compute == {"accelerator_type": accelerator_type, "accelerator_count": count}
    jobs = pytest.importorskip("databricks.bundles.jobs")
    jobs.Job.from_dict(job)
    # The command runs once per node and starts that node's ranks: the count must fit one node.
    per_node = int(re.fullmatch(r"GPU_(\d+)x\w+", accelerator_type).group(1))
    assert compute["accelerator_count"] <= per_node
    default_per_node = int(re.fullmatch(r"GPU_(\d+)x\w+", variable_defaults(bundle)["accelerator_type"]).group(1))
    assert int(variable_defaults(bundle)["accelerator_count"]) <= default_per_node


def command_args() -> list[str]:
    """The `spark-mnist train` arguments of jobs/serverless_gpu_train.sh, its variables given values."""
    import shlex

    (line,) = [l for l in GPU_COMMAND.read_text().splitlines() if l.startswith("exec spark-mnist train")]
    words = shlex.split(line.replace('"$config"', str(GPU_CONF)).replace('"$gpus"', "1").replace('"$@"', ""))
    return words[2:]


def test_the_command_starts_one_torchrun_rank_per_gpu_of_the_node(gpu_job):
    from spark_mnist.cli import settings_from_args

    deployment = tasks_by_key(gpu_job)["train"]["ai_runtime_task"]["deployments"][0]
    assert deployment["command_path"] == f"{FILE_PATH}/jobs/serverless_gpu_train.sh"
    assert GPU_COMMAND.is_file() and os.access(GPU_COMMAND, os.X_OK)
    args = build_parser().parse_args(command_args())
    settings = settings_from_args(args)
    assert settings.train.launcher == "torchrun" and settings.train.use_gpu and settings.train.auto_resume
    assert settings.train.converter == "none" and settings.train.loader == "spark-mnist"
    ingest = parse_task(tasks_by_key(gpu_job)["ingest"], "ingest")
    assert settings.train.data == ingest.output, "train reads what ingest wrote"
    assert settings.train.run_dir.startswith("/Volumes/") and not DBFS.match(settings.train.run_dir)
    with open(GPU_CONF, encoding="utf-8") as f:
        conf = yaml.safe_load(f)
    assert conf["ingest"]["output"] == ingest.output and conf["ingest"]["source"] == ingest.source


@pytest.mark.parametrize("node_env, refused", [
    ({}, False),
    ({"WORLD_SIZE": "2", "NODE_RANK": "0"}, False),  # one node of 2 GPUs: its ranks are the run's
    ({"WORLD_SIZE": "16", "NODE_RANK": "0"}, True),  # accelerator_count 16 on nodes of 2 GPUs
    ({"WORLD_SIZE": "16", "NODE_RANK": "1"}, True),
])
def test_the_command_refuses_a_run_beyond_one_node(tmp_path, node_env, refused):
    """The script's guard, on CPU: ``python`` says the node has 2 GPUs and ``spark-mnist`` records its arguments."""
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("python", "echo 2"), ("spark-mnist", f'echo "$@" > {tmp_path / "args"}')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "NODE_RANK")}
    env.update(node_env, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    result = subprocess.run(["bash", str(GPU_COMMAND)], capture_output=True, text=True, env=env, timeout=60)
    if refused:
        assert result.returncode == 2 and not (tmp_path / "args").exists()
        (line,) = result.stderr.strip().splitlines()
        assert "multi-node serverless runs are not supported yet" in line and "at most 2" in line
    else:
        assert result.returncode == 0, result.stderr
        assert "--launcher torchrun --use-gpu --num-processes 2" in (tmp_path / "args").read_text()
