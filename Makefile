# `make run` trains the tiny recipe; `make test` runs the test suite. Each sets up .venv itself.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
READY := $(VENV)/.ready
# One torch thread per process, for CI and shared machines only: when other work holds the cores, torch's
# default (a thread per core) leaves libgomp's threads spinning for cores they do not get, and any torch loop,
# the bare one as much as the strategy, runs many times slower. The library does not need it (its comm thread
# runs torch single-threaded): on a dedicated machine `make run OMP_NUM_THREADS=$(nproc)` is torch's default.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= $(OMP_NUM_THREADS)
# The slow tests' bound: SIGTERM at the limit (Lightning turns it into an exception inside one test and pytest
# carries on), then SIGKILL after a grace period, so the bound is real.
SLOW_TEST_LIMIT ?= 2400
DISTRIBUTED_TEST_LIMIT ?= 1500
FLOWER_TEST_LIMIT ?= 420
KILL_GRACE ?= 30

.PHONY: run test test-fast test-slow test-distributed test-flower clean

$(READY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# On this project's machines torch==2.13.0 is a local CPU wheel; a plain `torch` would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: $(READY)
	$(BIN)/parablock fit --config recipes/tiny.yaml

test: test-fast test-slow test-distributed test-flower

test-fast: $(READY)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(READY)
	timeout -k $(KILL_GRACE) $(SLOW_TEST_LIMIT) $(BIN)/python -m pytest -m "slow and not distributed and not flower" -q

# Several processes (gloo): each launch carries its own timeout and kills its process group.
test-distributed: $(READY)
	timeout -k $(KILL_GRACE) $(DISTRIBUTED_TEST_LIMIT) $(BIN)/python -m pytest -m distributed -q

# A real Flower deployment on 127.0.0.1 (SuperLink, SuperNodes, sites): each test ends every process it started;
# the bound ends pytest itself (and, SIGKILL after the grace, whatever it left).
test-flower: $(READY)
	timeout -k $(KILL_GRACE) $(FLOWER_TEST_LIMIT) $(BIN)/python -m pytest -m flower -q

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
