# Every target works on a fresh clone: the environment is created on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Pinned: an unpinned torch pulls the CUDA wheels (several GB) on machines that do not need them.
TORCH_VERSION ?= 2.13.0
# Where torch comes from: empty means pip's configured index; e.g. https://download.pytorch.org/whl/cpu for the
# CPU-only build on Linux (PyPI's Linux wheel carries CUDA).
TORCH_INDEX_URL ?=

.PHONY: install test lint demo bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests scripts

demo: install
	$(BIN)/python scripts/demo.py

bench: install
	$(BIN)/pip install -q -e ".[test,bench]"
	$(BIN)/python scripts/bench.py

# On a CUDA machine (with a CUDA build of torch: make install TORCH_VERSION=... or pip install torch first).
gpu-check: install
	$(BIN)/python scripts/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
