# spark-mnist: every target does its own set-up, idempotently, then runs.
#   make test               the test suite in every CI lane, one after the other (CI calls this)
#   make test LANE=spark35  ... in one lane
#   make run  [LANE=...]    ingest the Debian Fashion-MNIST files and train with conf/local.yaml (local[2], 2 CPU ranks)
#   make run REMOTE=local[2]  ... the same over Spark Connect (a local server; or REMOTE=sc://host:port)
#   make bench [LANE=...]   loader and ingest benchmarks (one table, one JSON line)
# A lane is a runtime's library stack, locked in requirements/lanes/LANE.txt (see README "Runtimes"):
#   spark35        as on Databricks Runtime 15.4 LTS ML: pyspark 3.5, pyarrow 14, numpy 1, pandas 1.5, pydantic 1.10,
#                  petastorm (the petastorm path)
#   spark40        as on 17.3 LTS ML: pyspark 4.0, pyarrow 19, numpy 2.1, pandas 2.2 (the shards read directly)
#   spark4-latest  the newest pyspark 4.x, pyarrow and numpy 2 that resolve together, pandas < 3
SHELL := /bin/bash
PYTHON ?= python3
LANES := spark35 spark40 spark4-latest
DEFAULT_LANE := spark40
ONE_LANE = $(or $(LANE),$(DEFAULT_LANE))
VENV = .venv/$(ONE_LANE)
PY = $(VENV)/bin/python
STAMP = $(VENV)/.installed
LOCK = requirements/lanes/$(ONE_LANE).txt
TORCH_SPEC ?= torch==2.13.0
EXTRAS_spark35 := local,petastorm,dev,plots,mlflow
EXTRAS_spark40 := local,connect,dev,plots,mlflow
EXTRAS_spark4-latest := local,connect,dev,plots,mlflow
FASHION_DIR := /usr/share/datasets/fashion-mnist
# Lanes whose pyspark has Spark Connect (the connect extra), and the server their Connect tests use.
CONNECT_LANES := spark40 spark4-latest
TEST_REMOTE := local[2]

.PHONY: run test test-lane bench bench-scale setup venv java data lock clean

run: setup
	$(VENV)/bin/spark-mnist run --config conf/local.yaml $(if $(REMOTE),--remote '$(REMOTE)')

# Without LANE: every lane, each in its own environment; the target fails if any lane failed.
test:
	@failed=""; for lane in $(or $(LANE),$(LANES)); do \
	  echo "=== lane $$lane"; \
	  $(MAKE) --no-print-directory test-lane LANE=$$lane || failed="$$failed $$lane"; \
	done; \
	if [ -n "$$failed" ]; then echo "failed lanes:$$failed" >&2; exit 1; fi

# The Spark 4 lanes run the suite classic, then the tests marked connect again over a local Spark Connect server
# (SparkSession.builder.remote("local[2]")): one kind of session per process.
test-lane: setup
	$(PY) -m pytest --durations=5
	@if [ -n "$(filter $(ONE_LANE),$(CONNECT_LANES))" ]; then \
	  echo "=== lane $(ONE_LANE), over Spark Connect (SPARK_MNIST_TEST_REMOTE=$(TEST_REMOTE))"; \
	  SPARK_MNIST_TEST_REMOTE='$(TEST_REMOTE)' $(PY) -m pytest -m connect --durations=5; \
	fi

bench: setup
	$(PY) -m benchmarks.bench_loader

bench-scale: setup
	$(PY) -m benchmarks.bench_scale

setup: venv java data

venv: $(STAMP)

# The lane's virtual environment: torch's CPU wheel first (an exact pin; a range would pull a multi-GB CUDA build),
# then the package with the lane's locked stack.
$(STAMP): pyproject.toml $(LOCK)
	@case " $(LANES) " in *" $(ONE_LANE) "*) ;; *) echo "spark-mnist: unknown LANE=$(ONE_LANE); lanes: $(LANES)" >&2; exit 2;; esac
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -c $(LOCK) -e '.[$(EXTRAS_$(ONE_LANE))]'
	touch $(STAMP)

# Re-resolve a lane's lock from requirements/lanes/LANE.in (the versions the lane stands for) in a scratch venv.
lock:
	rm -rf .venv/lock-$(ONE_LANE) && $(PYTHON) -m venv .venv/lock-$(ONE_LANE)
	.venv/lock-$(ONE_LANE)/bin/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	.venv/lock-$(ONE_LANE)/bin/pip install --quiet --disable-pip-version-check -r requirements/lanes/$(ONE_LANE).in \
	  -e '.[$(EXTRAS_$(ONE_LANE))]'
	( echo "# make lock LANE=$(ONE_LANE): resolved from requirements/lanes/$(ONE_LANE).in; do not edit by hand"; \
	  .venv/lock-$(ONE_LANE)/bin/pip freeze --exclude-editable | grep -v '^-e ' ) > $(LOCK)
	rm -rf .venv/lock-$(ONE_LANE)

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
