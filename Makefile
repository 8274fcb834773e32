PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint bench

setup: $(STAMP)

# torch comes first and pinned: on these machines 2.13.0 (CPU build) is a local file, and an
# unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -x --timeout=900 tests

demo: setup
	$(BIN)/fxsparse demo

lint: setup
	$(BIN)/ruff check fxsparse passes codegen tests benchmarks
