# segsvc: `make run` serves, `make test` tests. Both set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
PYTEST_ARGS ?= -n 2

.PHONY: run test lint typecheck migrate bench bench-ab services install clean reset-local-data validate-manifests lock images

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

run: $(STAMP)  ## migrations, API on :$${SEG_PORT:-8000}, worker, in the foreground
	$(BIN)/segsvc run

services:  ## make sure the local Postgres and Redis the tests use are up
	bash scripts/ensure-services.sh

test: $(STAMP) services
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)  ## mypy --strict on segsvc, api, worker, retrain, bench
	$(BIN)/mypy

migrate: $(STAMP)
	$(BIN)/segsvc db upgrade

bench: $(STAMP) services
	$(BIN)/python -m bench.run

bench-ab: $(STAMP) services  ## interleaved A/B of the running system: make bench-ab BASE=<rev>
	@test -n "$(BASE)" || { echo "usage: make bench-ab BASE=<git rev> [AB_ARGS='--rounds 6']"; exit 2; }
	$(BIN)/python -m bench.ab --base $(BASE) $(AB_ARGS)

validate-manifests: $(STAMP)  ## yamllint, k8s + KEDA schemas, compose spec, kustomize renders
	$(BIN)/pytest -q tests/ops/test_manifests.py

lock: $(STAMP)  ## re-pin requirements/*.txt (the images' dependencies) from the tested venv
	$(BIN)/python requirements/lock.py

images:  ## build the api, worker and worker-gpu images
	for t in api worker worker-gpu; do docker build --target $$t -t segsvc-$$t:dev . || exit 1; done

clean:  ## caches and make bench-ab's checkouts; keeps var/'s data (see reset-local-data)
	rm -rf .pytest_cache .mypy_cache .ruff_cache var/ab var/bench
	-git worktree prune  # forget make bench-ab's checkouts, which lived under var/ab

reset-local-data:  ## DELETES var/: make run's SQLite database (jobs, labels, API keys), retrained models, blobs
	@printf 'This deletes var/ (make run'"'"'s jobs, feedback labels, API keys and retrained models). Type yes: '; \
	read answer; [ "$$answer" = yes ] || { echo "kept var/"; exit 1; }
	rm -rf var
