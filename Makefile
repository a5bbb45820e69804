# ims-token-refresher — two commands for newcomers: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: demo test lint bench soak fuzz image manifests validate clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

## demo: run the real refresher against the built-in IMS emulator and show the token it published
demo: $(STAMP)
	$(BIN)/python scripts/demo.py

## test: install what the tests need, lint, and run the whole suite
test: $(STAMP) lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

## lint: ruff, mypy --strict, and the import-layering contract
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## bench: benchmarks against the emulator and peers; writes docs/benchmarks.md
bench: $(STAMP)
	$(BIN)/python bench/run.py

## soak / fuzz: the long reliability runs (not part of `make test`)
soak: $(STAMP)
	$(BIN)/python -m pytest -q -m soak tests/reliability --soak-minutes=$${SOAK_MINUTES:-10}

fuzz: $(STAMP)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-10000} $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -k "fuzz or random or mutated or truncated" tests/test_credentials.py tests/test_fuzz_ims.py

## image: build the container image (needs a Docker engine; none on CI machines here)
image:
	docker build -t ims-token-refresher:dev .

## manifests: render every kustomization; validate: render and validate them offline
manifests: $(STAMP)
	@for d in manifests/base manifests/examples/* manifests/monitoring; do \
	  echo "--- $$d"; $(BIN)/kubectl kustomize $$d || exit 1; done

validate: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_manifests.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
