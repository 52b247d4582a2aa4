# minipaged: the two entry commands are `make demo` and `make test` (see README.md); `make check`
# runs the fast tests only (under two minutes), for a quick answer while working on an assignment.
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

# The fast tests: the paged memory manager (reference/), the scheduler, the kernel contract on the
# reference backend, sampling and beam search, the engine under memory pressure and its refusals,
# the swap cache, the homework generators and tensor parallelism's refusals.
# Left out (`make test` runs them): Triton's interpreter (-k "not triton"), the experiments, the
# server, subprocesses (-k "not another_process"), worker processes (-m "not multiprocess"), the
# tutorials and the docs build.
CHECK_TESTS := $(addprefix tests/test_,$(addsuffix .py,block_allocator block_table block_manager \
	block_manager_state_machine prefix_cache scheduler scheduler_budget attention_reference \
	kernel_contract kernel_contract_errors copy_on_write_data sampling beam_search engine_memory \
	engine_errors viz readme swap_cache homework tensor_parallel))

.PHONY: demo test check lint docs format clean

demo: $(VENV)/.installed
	$(BIN)/minipaged demo
	@echo
	@echo "To run minipaged yourself, put the virtualenv on your PATH:"
	@echo "    source $(VENV)/bin/activate     # then: minipaged --help"
	@echo "or call it by its path: $(BIN)/minipaged --help"

# One line per test, numbered ([ 12/873]), printed as the test starts: a slow one shows its name.
test: $(VENV)/.dev lint
	$(BIN)/python -m pytest -v -o console_output_style=count
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

check: $(VENV)/.dev
	$(BIN)/python -m pytest -o console_output_style=count -k "not triton and not another_process" \
		-m "not multiprocess" $(CHECK_TESTS)

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

# Debian packages some tests drive: a real browser for the step-through page (chromium, chromedriver)
# and node to compile every formula with the site's KaTeX. Installed when we are root with apt-get
# (CI is); otherwise named, and those tests skip with the same command in their message.
SYSTEM_PACKAGES := chromium chromium-driver nodejs

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/pip install -e ".[dev,docs]"
	@if ! command -v chromedriver >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); \
	  else \
	    echo "note: the browser and KaTeX tests need: apt-get install $(SYSTEM_PACKAGES)"; \
	  fi; \
	fi
	touch $@

clean:
	rm -rf $(VENV) site .pytest_cache .ruff_cache .hypothesis
