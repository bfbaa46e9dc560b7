# The common loops. `make run` and `make test` are the two README commands.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
N       ?= 100000
CLIENTS ?= 20000
BROADCAST_CLIENTS ?= 50000

.PHONY: run test unit integration proto proto-check lint bench bench-connections bench-unicast bench-logins bench-broadcast bench-flood clean

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

bench-unicast: $(STAMP)   ## CLIENTS acking clients, 512-byte pushes over 16 keep-alive HTTP connections: make bench-unicast CLIENTS=20000
	$(BIN)/python bench/unicast.py --clients $(CLIENTS)

bench-logins: $(STAMP)    ## AUTH_OK latency at 200 and 1,000 connects/s (open loop), connects/s with 64 in flight
	$(BIN)/python bench/logins.py

bench-flood: $(STAMP)     ## a connect flood from one address vs logins from another (the room's access policy)
	$(BIN)/python bench/flood.py

bench-broadcast: $(STAMP) ## 20 x 512 B broadcasts to BROADCAST_CLIENTS acking clients, late joiners, re-connectors: make bench-broadcast BROADCAST_CLIENTS=50000
	$(BIN)/python bench/broadcast.py --clients $(BROADCAST_CLIENTS)

clean:
	rm -rf $(VENV) var build *.egg-info
