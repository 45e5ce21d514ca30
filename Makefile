# The project's commands. `make demo` and `make test` work on a fresh machine with Python 3.11+ and make.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: venv demo test lint typecheck unit fmt run bench soak fuzz clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## The main job on the embedded default: mock upstream, sidecar, 30 s of traffic, summary.
demo: venv
	$(BIN)/llm-sidecar demo --duration $${DEMO_SECONDS:-30}

## Format check, lint, strict types, and the test suite.
test: lint typecheck unit

lint: venv
	$(BIN)/ruff format --check sidecar tests
	$(BIN)/ruff check sidecar tests

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

fmt: venv
	$(BIN)/ruff format sidecar tests
	$(BIN)/ruff check --fix sidecar tests

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
