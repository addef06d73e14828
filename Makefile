# perf_pipeline — the two commands: `make dev` (run it) and `make test` (test it).
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
SCENARIO ?= all
DURATION ?= 30m

.PHONY: install dev test test-system test-browser screenshots chromium lint bench bench-scale soak validate up down clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## make dev: embedded PostgreSQL + Redis, migrations, demo data if empty, Dagster UI on http://127.0.0.1:3000
dev: install
	$(BIN)/perf-pipeline dev

## make test: the whole suite on real servers (embedded unless PERF_PIPELINE_TEST_*_URL are set)
test: install
	$(BIN)/pytest -n 2 --dist loadfile $(PYTEST_ARGS)

## the same suite against this machine's system PostgreSQL 15 and Redis
test-system: install
	PERF_PIPELINE_TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \
	PERF_PIPELINE_TEST_REDIS_URL=redis://127.0.0.1:6379/0 \
	$(BIN)/pytest -n 2 --dist loadfile $(PYTEST_ARGS)

## Debian's Chromium for the screenshots and the browser test (installed when missing; needs root or sudo)
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

## make screenshots: PNGs of the UI of a running `make dev` into docs/images/ (lineage, partitions, checks, plots, freshness, archive, automation, runs)
screenshots: install chromium
	$(BIN)/python -m perf_pipeline.screenshots

## make test-browser: the UI's pages render without a JavaScript error (needs a running `make dev`)
test-browser: install chromium
	$(BIN)/pytest -m browser perf_pipeline_tests/browser $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check perf_pipeline perf_pipeline_tests bench deploy
	$(BIN)/ruff format --check perf_pipeline perf_pipeline_tests bench deploy

## make bench [SCENARIO=name]: benchmark scenarios (see bench/README.md); prints median/p95 tables
bench: install
	$(BIN)/python -m bench $(SCENARIO)

## make bench-scale: 100M audit + 20M usage rows over 24 months vs 1M, side by side (not in CI; SCALE_AUDIT_ROWS=…)
bench-scale: install
	$(BIN)/python -m bench.scale

## make soak [DURATION=30m]: webserver + daemon + API under load on private servers, with faults (bench/soak.py)
soak: install
	$(BIN)/python -m bench.soak --duration $(DURATION)

validate: install
	DAGSTER_HOME=$$(mktemp -d) $(BIN)/dagster definitions validate -m perf_pipeline.definitions

up: install
	$(BIN)/perf-pipeline up

down: install
	$(BIN)/perf-pipeline down

clean: down
	rm -rf .perf_pipeline
