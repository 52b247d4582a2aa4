# minipaged: the two entry commands are `make demo` and `make test` (see README.md).
#
# Both create a virtualenv in $(VENV). torch: if $(PYTHON) already has a torch, the venv sees it
# (--system-site-packages) and it is kept; otherwise $(TORCH) is installed first. The default pin,
# torch==2.13.0, is the CPU wheel that this project's build machines carry locally (an unpinned torch
# would pull several GB of CUDA packages); elsewhere override it: `make demo TORCH=torch`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
HAVE_TORCH := $(shell $(PYTHON) -c "import torch" >/dev/null 2>&1 && echo yes)
VENV_FLAGS := $(if $(HAVE_TORCH),--system-site-packages,)

.PHONY: demo test lint docs format clean

demo: $(VENV)/.installed
	$(BIN)/minipaged demo

test: $(VENV)/.dev lint
	$(BIN)/python -m pytest
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

docs: $(VENV)/.dev
	$(BIN)/mkdocs serve

$(BIN)/python:
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" >/dev/null 2>&1 || $(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/pip install -e ".[dev,docs]"
	touch $@

clean:
	rm -rf $(VENV) site .pytest_cache .ruff_cache .hypothesis
