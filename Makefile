# spark-mnist: every target does its own set-up, idempotently, then runs.
#   make test               the test suite in every CI lane, side by side, and the kit's example (CI calls this)
#   make test LANE=spark35  ... in one lane
#   make test-fast          the tests that start no Spark job, server or training, one lane, two workers
#   make run  [LANE=...]    ingest the Debian Fashion-MNIST files and train with conf/local.yaml (local[2], 2 CPU ranks)
#   make run REMOTE=local[2]  ... the same over Spark Connect (a local server; or REMOTE=sc://host:port)
#   make bench [LANE=...]   loader and ingest benchmarks (one table, one JSON line)
#   make lint               ruff (lint and format), mypy and import-linter over spark_mnist/ (make test runs it too)
#   make docs               the documentation site, docs/_build/html, warnings as errors (make test builds it too)
# A lane is a runtime's library stack, locked in requirements/lanes/LANE.txt (see README "Runtimes"):
#   spark35        as on Databricks Runtime 15.4 LTS ML: pyspark 3.5, pyarrow 14, numpy 1, pandas 1.5, pydantic 1.10,
#                  petastorm (the petastorm path)
#   spark40        as on 17.3 LTS ML: pyspark 4.0, pyarrow 19, numpy 2.1, pandas 2.2 (the shards read directly)
#   spark4-latest  the newest pyspark 4.x, pyarrow and numpy 2 that resolve together, pandas < 3
SHELL := /bin/bash
# Python writes the bytecode of what it imports (into .venv and the git-ignored __pycache__ folders), so that each
# rank, child command and test process does not compile torch's modules again: seconds of CPU each, where the
# machine sets PYTHONDONTWRITEBYTECODE.
unexport PYTHONDONTWRITEBYTECODE
PYTHON ?= python3
LANES := spark35 spark40 spark4-latest
DEFAULT_LANE := spark40
ONE_LANE = $(or $(LANE),$(DEFAULT_LANE))
VENV = .venv/$(ONE_LANE)
PY = $(VENV)/bin/python
STAMP = $(VENV)/.installed
LOCK = requirements/lanes/$(ONE_LANE).txt
TORCH_SPEC ?= torch==2.13.0
EXTRAS_spark35 := torch,local,petastorm,dev,plots,mlflow
EXTRAS_spark40 := torch,local,connect,dev,plots,mlflow,ai-runtime
EXTRAS_spark4-latest := torch,local,connect,dev,plots,mlflow
FASHION_DIR := /usr/share/datasets/fashion-mnist
# Lanes whose pyspark has Spark Connect (the connect extra), and the server their Connect tests use.
CONNECT_LANES := spark40 spark4-latest
# The lane that runs the full matrices (tests marked full: every store kill point and racing writers; SIGKILLs,
# restarts and resumes across launchers; the end-to-end runs), classic and over Connect.  The other lanes run each
# store's replace and one kill, and train once under each launcher they have.  Tests marked one_lane need only what
# every lane holds alike (torch, databricks-bundles, the wheel's build, uv): ONE_LANE_TESTS runs them, off the full
# lane, whose classic pass ends last.
FULL_LANE := spark40
ONE_LANE_TESTS := spark35
TEST_REMOTE := local[2]
comma := ,

.PHONY: docs lint run test test-fast test-lane test-kit test-times stores gpu-check gpu-bundle bench bench-scale setup venv venvs java data lock clean

# uv builds the lane environments and resolves the locks (pip's wheels and indexes: requirements/uv_args.py).
UV_VERSION := 0.13.9
UV_HOME := .venv/.uv
UV := $(UV_HOME)/bin/uv
UV_ARGS = $(shell $(PYTHON) requirements/uv_args.py)
# Test passes (each lane's classic pass, each Spark 4 lane's Connect pass, the kit) run side by side, TEST_JOBS at
# once, each pass's log printed whole when it ends.
TEST_JOBS ?= 6
LOGS := .venv/test-logs
TEST_TMP := /tmp/spark-mnist-tests
# The JVMs the tests start (sessions, Connect servers, child commands' drivers; spark-submit reads SPARK_SUBMIT_OPTS)
# live seconds to minutes: the client compiler alone and the serial collector take a third less CPU than the defaults.
TEST_JVM_OPTS := -XX:TieredStopAtLevel=1 -XX:+UseSerialGC
# The passes share 2 cores, and torch's OpenMP threads spin while they wait for work: passive waiting took 188 and
# 197 CPU-s for the spark35 and spark4-latest classic passes side by side, against 200 and 202; one OpenMP thread a
# process (the ranks still set theirs: train.threads_per_rank) took 98 and 96 CPU-s for the spark4-latest classic
# pass alone, against 101 and 110 (docs/development.md).
TEST_ENV := OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 SPARK_SUBMIT_OPTS="$(TEST_JVM_OPTS)"
# Each pass runs under scripts/bounded.sh: in a process group of its own (timeout(1)'s), so that no signal a pass's
# processes send to their group reaches make or another pass; for at most PASS_TIMEOUT seconds (then SIGINT: pytest
# prints where it stood; SIGKILL 60 s later); Ctrl-C handed on to the whole pass.
PASS_TIMEOUT ?= 2400
BOUNDED = scripts/bounded.sh $(PASS_TIMEOUT)
# The passes of a lane: classic, and over Connect where its pyspark has Connect.
passes = test-classic-$(1) $(if $(filter $(1),$(CONNECT_LANES)),test-connect-$(1))

run: setup
	$(VENV)/bin/spark-mnist run --config conf/local.yaml $(if $(REMOTE),--remote '$(REMOTE)')

# Without LANE: every lane's passes and the kit, TEST_JOBS at a time, each lane in its own environment; then each
# pass's wall time and its slowest tests.  The target fails if any pass failed.
test: java data
	@start=$$(date +%s); rm -rf $(LOGS); mkdir -p $(LOGS); \
	lanes="$(or $(LANE),$(LANES))"; \
	$(MAKE) --no-print-directory -j$(TEST_JOBS) stores venvs VENV_LANES="$$lanes" || exit 1; \
	echo "=== stores and environments ready in $$(( $$(date +%s) - start )) s"; \
	$(MAKE) --no-print-directory -k -j$(TEST_JOBS) --output-sync=target \
	  $(foreach l,$(or $(LANE),$(LANES)),$(call passes,$(l))) $(if $(LANE),,test-kit lint docs); \
	status=$$?; $(MAKE) --no-print-directory test-times; \
	echo "=== make test: $$(( $$(date +%s) - start )) s wall, lanes: $$lanes"; exit $$status

test-lane: test-lane-$(ONE_LANE)

# One lane's passes (its environment already made).
test-lane-%:
	@$(MAKE) --no-print-directory -k $(call passes,$*)

# A lane's classic pass: the suite on a classic local[2] session; in FULL_LANE with the full matrices, on two
# pytest-xdist workers (a module's tests on one worker, so its fixtures are made once).  Each pass has its own
# pytest base temporary directory.
test-classic-%:
	@mkdir -p $(LOGS) $(TEST_TMP); t=$$(date +%s); \
	$(TEST_ENV) $(BOUNDED) .venv/$*/bin/python -m pytest --durations=5 -p no:cacheprovider \
	  --basetemp=$(TEST_TMP)/$*-classic $(if $(filter $*,$(FULL_LANE)),-n 2 --dist loadfile -m "not one_lane",-m "not full$(if $(filter $*,$(ONE_LANE_TESTS)),, and not one_lane)"); s=$$?; \
	echo "$* classic $$(( $$(date +%s) - t ))" >> $(LOGS)/times; exit $$s

# A Spark 4 lane's Connect pass, over a local Spark Connect server (SparkSession.builder.remote("local[2]")): in
# FULL_LANE the tests marked connect again; in another lane those of CONNECT_SMOKE, the Connect ingest against the
# classic one byte for byte (one write job, and the relation uploaded in chunks): the path of ours whose Spark calls
# differ over Connect.  The other tests marked connect run driver code the lane's classic pass runs (all of them
# took 103 CPU-s in spark4-latest, this file 25: docs/development.md).  With SPARK_TESTING set, pyspark binds a
# local server to an ephemeral port and its client finds it (SPARK-42272: pyspark's own tests run side by side that
# way), so the Connect passes of the lanes run at once rather than in turn on port 15002.
CONNECT_SMOKE := tests/test_connect.py
test-connect-%:
	@mkdir -p $(LOGS) $(TEST_TMP); t=$$(date +%s); \
	SPARK_TESTING=1 $(TEST_ENV) $(BOUNDED) .venv/$*/bin/python -m pytest \
	  -m connect $(if $(filter $*,$(FULL_LANE)),,$(CONNECT_SMOKE)) --spark-remote '$(TEST_REMOTE)' \
	  --durations=5 -p no:cacheprovider --basetemp=$(TEST_TMP)/$*-connect; s=$$?; \
	echo "$* connect $$(( $$(date +%s) - t ))" >> $(LOGS)/times; exit $$s

# The example of a user's own tests (examples/user_tests) against the installed wheel, in a fresh directory outside
# the source tree, in a fresh environment: lane KIT_LANE's lock, then the built wheel with the extras the docs' local
# install names (KIT_EXTRAS, docs/how-to/testing.md), resolved from the wheel's own metadata with the lock as
# constraints; an extra the wheel does not have fails the target.  (Resolving the extras into an empty environment
# instead would build pyspark's sdist metadata, about a minute more.)
KIT_LANE := spark40
KIT_EXTRAS := torch,local
KIT := $(TEST_TMP)/kit
test-kit: $(UV)
	@rm -rf $(KIT) && mkdir -p $(KIT)/project && t=$$(date +%s); \
	$(UV) build --quiet --wheel --out-dir $(KIT)/dist . && \
	$(UV) venv --quiet --python $(PYTHON) $(KIT)/venv && \
	$(UV) pip sync --quiet --python $(KIT)/venv/bin/python $(UV_ARGS) \
	  requirements/lanes/$(KIT_LANE).txt && \
	wheel=$$(ls $(KIT)/dist/spark_mnist-*.whl) && \
	$(UV) pip install --python $(KIT)/venv/bin/python $(UV_ARGS) -c requirements/lanes/$(KIT_LANE).txt \
	  "$$wheel[$(KIT_EXTRAS)]" > $(KIT)/install.log 2>&1; s=$$?; \
	if [ $$s -ne 0 ] || grep -i "warning" $(KIT)/install.log; then cat $(KIT)/install.log; exit 1; fi && \
	cp examples/user_tests/*.py $(KIT)/project/ && \
	( cd $(KIT)/project && $(CURDIR)/$(BOUNDED) $(KIT)/venv/bin/python -m pytest -q -p no:cacheprovider --rootdir . ); s=$$?; \
	mkdir -p $(LOGS); echo "kit $(KIT_LANE) $$(( $$(date +%s) - t ))" >> $(LOGS)/times; exit $$s

# ruff, mypy and import-linter, pinned in requirements/lint.txt, in an environment of their own; mypy reads lane
# spark40's libraries (pyspark, pyarrow, numpy, torch) for the package's imports; lint-imports checks the arrows of
# docs/concepts/architecture.md.  Settings: pyproject.toml's [tool.ruff], [tool.mypy], [tool.importlinter].
LINT_VENV := .venv/lint
LINT_LANE := spark40
lint: $(LINT_VENV)/.installed
	@$(MAKE) --no-print-directory venv LANE=$(LINT_LANE)
	@t=$$(date +%s); $(LINT_VENV)/bin/ruff check spark_mnist && $(LINT_VENV)/bin/ruff format --check spark_mnist && \
	$(LINT_VENV)/bin/mypy --python-executable .venv/$(LINT_LANE)/bin/python && $(LINT_VENV)/bin/lint-imports; s=$$?; \
	mkdir -p $(LOGS); echo "lint - $$(( $$(date +%s) - t ))" >> $(LOGS)/times; exit $$s

$(LINT_VENV)/.installed: requirements/lint.txt | $(UV)
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(LINT_VENV)
	$(UV) pip install --quiet --python $(LINT_VENV)/bin/python $(UV_ARGS) -r requirements/lint.txt
	touch $@

# Sphinx over docs/ (docs/README.md): every warning, unresolved references included (-n), is an error; no network.
DOCS_VENV := .venv/docs
docs: $(DOCS_VENV)/.installed
	@t=$$(date +%s); rm -rf docs/_build && \
	$(DOCS_VENV)/bin/python -m sphinx -b html -W -n --keep-going -q docs docs/_build/html; s=$$?; \
	mkdir -p $(LOGS); echo "docs - $$(( $$(date +%s) - t ))" >> $(LOGS)/times; exit $$s

$(DOCS_VENV)/.installed: pyproject.toml requirements/lanes/$(LINT_LANE).txt requirements/docs.txt | $(UV)
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(DOCS_VENV)
	$(UV) pip sync --quiet --python $(DOCS_VENV)/bin/python $(UV_ARGS) requirements/lanes/$(LINT_LANE).txt
	$(UV) pip install --quiet --python $(DOCS_VENV)/bin/python $(UV_ARGS) -r requirements/docs.txt
	$(UV) pip install --quiet --python $(DOCS_VENV)/bin/python --no-deps -e .
	touch $@

test-times:
	@test -f $(LOGS)/times && while read lane pass secs; do echo "=== $$lane $$pass pass: $$secs s"; done < $(LOGS)/times || true

# The development loop: one lane (default spark40), no Spark-starting or training tests (-m "not slow"), two workers.
test-fast: venv
	$(PY) -m pytest -q -m "not slow" -n 2 -p no:cacheprovider $(ARGS)

# What tests/test_stores.py needs beside the dev extra: fuse3 (apt, as root) and Azurite (npm, into .cache/stores).
# Never fails: a missing piece makes its store's tests skip with the reason.
stores:
	@bash tests/stores/setup.sh

# On a machine with an NVIDIA GPU: a CUDA build of torch (from the package index: the exact pin without the CPU wheel
# on disk) over lane GPU_LANE's stack in .venv/gpu, then scripts/gpu_check.py (GPU tests, the main job under
# torchrun on one GPU and on all, then databricks.air's local mode; one JSON line).  Fails at once without a GPU.
GPU_LANE := spark40
gpu-check: $(UV) java data
	$(UV) venv --quiet --allow-existing --seed --python $(PYTHON) .venv/gpu
	grep -v '^torch==' requirements/lanes/$(GPU_LANE).txt > .venv/gpu/requirements.txt
	$(UV) pip install --quiet --python .venv/gpu/bin/python -r .venv/gpu/requirements.txt \
	  '$(TORCH_SPEC)'
	$(UV) pip install --quiet --python .venv/gpu/bin/python --no-deps -e .
	.venv/gpu/bin/python scripts/gpu_check.py

# For a GPU machine without network, Java or pyspark (it has Python with torch, numpy, pyarrow, pandas, pyyaml, tqdm,
# requests and pytest): .gpu-bundle/ with the project's wheel, the wheels it lacks (pydantic's) for Python GPU_PYTHON
# on manylinux x86_64 at lane GPU_LANE's pins, dataset DATA ingested here, and BUNDLE.json; at most 60 MiB.  Copy the
# working tree with it there and run: python3 scripts/gpu_check.py --bundle .gpu-bundle (docs/gpu-check.md).
GPU_PYTHON ?= 3.12
DATA ?= fashion-mnist
gpu-bundle: venv java data
	$(PY) scripts/gpu_bundle.py --out .gpu-bundle --python-version $(GPU_PYTHON) --dataset $(DATA) \
	  --ingest-python $(PY) --lock requirements/lanes/$(GPU_LANE).txt --uv $(UV)

bench: setup
	$(PY) -m benchmarks.bench_loader

bench-scale: setup
	$(PY) -m benchmarks.bench_scale

setup: venv java data

venv: $(STAMP)

# The environments of VENV_LANES (default: every lane) once uv is there, side by side under make -j (make test
# builds them beside the stores' set-up: 19.5 s for the two on a fresh clone here, against 26 s one after the other).
VENV_LANES ?= $(LANES)
venvs: $(UV)
	@$(MAKE) --no-print-directory $(foreach l,$(VENV_LANES),venv-$(l))

# One lane's environment by name, so that make -j builds several at once (uv's cache takes concurrent installs).
venv-%:
	@$(MAKE) --no-print-directory venv LANE=$*

$(UV):
	$(PYTHON) -m venv $(UV_HOME)
	$(UV_HOME)/bin/python -m pip install --quiet --disable-pip-version-check 'uv==$(UV_VERSION)'

# The lane's virtual environment, exactly its lock (torch's CPU wheel included: an exact pin, a range would pull a
# multi-GB CUDA build), then the package itself, editable.  --seed: pip too (tests run pip's resolver).
# uv, unlike pip, compiles no bytecode at install: Python caches what it imports instead (unexport, above).
$(STAMP): pyproject.toml $(LOCK) | $(UV)
	@case " $(LANES) " in *" $(ONE_LANE) "*) ;; *) echo "spark-mnist: unknown LANE=$(ONE_LANE); lanes: $(LANES)" >&2; exit 2;; esac
	$(UV) venv --quiet --allow-existing --seed --python $(PYTHON) $(VENV)
	$(UV) pip sync --quiet --python $(PY) $(UV_ARGS) $(LOCK)
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	touch $(STAMP)

# Re-resolve a lane's lock from requirements/lanes/LANE.in (the versions the lane stands for), torch's pin and the
# package's extras.  uv keeps the versions already in the lock where they still fit (--upgrade to move them).
lock: $(UV)
	echo '$(TORCH_SPEC)' | $(UV) pip compile --quiet $(UV_ARGS) --python $(PYTHON) --no-header --no-annotate \
	  $(foreach e,$(subst $(comma), ,$(EXTRAS_$(ONE_LANE))),--extra $(e)) \
	  requirements/lanes/$(ONE_LANE).in pyproject.toml - -o $(LOCK)
	sed -i '1i # make lock LANE=$(ONE_LANE): uv pip compile of requirements/lanes/$(ONE_LANE).in, torch and the extras; do not edit by hand' $(LOCK)

java:
	@command -v java >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null; \
	  fi; }
	@command -v java >/dev/null 2>&1 || { \
	  echo "spark-mnist: Java is missing: Spark 3.5 and 4 run on Java 17 (apt-get install openjdk-17-jre-headless)" >&2; \
	  exit 1; }

data:
	@test -f $(FASHION_DIR)/train-images-idx3-ubyte.gz || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || true; \
	  fi; }
	@test -f $(FASHION_DIR)/train-images-idx3-ubyte.gz || { \
	  echo "spark-mnist: Fashion-MNIST is missing from $(FASHION_DIR): apt-get install dataset-fashion-mnist" \
	       "(Debian), or run 'spark-mnist ingest --source DIR' with the four gz IDX files in DIR" >&2; \
	  exit 1; }

clean:
	rm -rf out .pytest_cache
