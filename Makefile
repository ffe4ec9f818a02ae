# `make run` trains the tiny recipe; `make test` runs the test suite. Each sets up .venv itself.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
READY := $(VENV)/.ready

.PHONY: run test test-fast test-slow clean

$(READY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# On this project's machines torch==2.13.0 is a local CPU wheel; a plain `torch` would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: $(READY)
	$(BIN)/parablock fit --config recipes/tiny.yaml

test: test-fast test-slow

test-fast: $(READY)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(READY)
	timeout 1200 $(BIN)/python -m pytest -m slow -q

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
