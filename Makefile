PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo lint bench

setup: $(STAMP)

# torch comes first and pinned: on these machines 2.13.0 (CPU build) is a local file, and an
# unpinned torch would pull a multi-GB CUDA build. The rest installs under constraints.txt: the versions the
# suite and the committed zoo table were checked with (a new transformers release adds architectures).
$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[app,test]"
	touch $(STAMP)

# The full run (CI): every test, the real-model ones included, and every docstring example (tests/test_doctests.py).
test: setup
	$(BIN)/python -m pytest -q -x --timeout=900 tests

# The fast lane while developing: skips the tests marked slow (real SmolLM2 model, minutes-long runs).
test-fast: setup
	$(BIN)/python -m pytest -q -x --timeout=900 -m "not slow" tests

demo: setup
	$(BIN)/fxsparse demo

lint: setup
	$(BIN)/ruff check fxsparse passes codegen tests benchmarks
