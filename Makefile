# spark-mnist: every target does its own set-up, idempotently, then runs.
#   make run    ingest the Debian Fashion-MNIST files and train with conf/local.yaml (local[2], 2 CPU ranks)
#   make test   the test suite
#   make bench  loader and ingest benchmarks (one table, one JSON line)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: run test bench bench-scale setup java data clean

run: setup
	$(VENV)/bin/spark-mnist run --config conf/local.yaml

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m benchmarks.bench_loader

bench-scale: setup
	$(PY) -m benchmarks.bench_scale

setup: $(STAMP) java data

# The virtual environment: torch's CPU wheel first (an exact pin; a range would pull a multi-GB CUDA build), then
# the package with the pinned, known-good stack (requirements/lock.txt; see README "Versions").
$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements/lock.txt -e '.[local,dev,plots,mlflow]'
	touch $(STAMP)

java:
	@command -v java >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null; \
	  fi; }
	@command -v java >/dev/null 2>&1 || { \
	  echo "spark-mnist: Java is missing: Spark 3.5 needs Java 8, 11 or 17 (apt-get install openjdk-17-jre-headless)" >&2; \
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
