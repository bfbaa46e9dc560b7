# The common loops. `make run` and `make test` are the two README commands.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
N       ?= 100000

.PHONY: run test unit integration proto proto-check lint bench bench-connections clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	@touch $(STAMP)

run: $(STAMP)         ## the whole system on this machine (installs Redis/MariaDB if missing)
	$(BIN)/pylon up

test: $(STAMP) proto-check   ## unit + integration tests (real Redis, MariaDB and service processes)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

proto: $(STAMP)       ## regenerate services/common/pb from proto/*.proto
	$(BIN)/python proto/gen.py

proto-check: $(STAMP)
	$(BIN)/python proto/gen.py --check

lint: $(STAMP)
	$(BIN)/ruff check .

bench-connections: $(STAMP)   ## hold N connections through a private system: make bench-connections N=100000
	$(BIN)/python bench/connections.py --connections $(N)

clean:
	rm -rf $(VENV) var build *.egg-info
