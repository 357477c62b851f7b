# `make demo` and `make test` install everything into .venv first (idempotent), torch 2.13.0 before
# the rest so that pip does not pull a CUDA build where a CPU one is wanted.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.xattn-installed

.PHONY: install demo test
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/xattn demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs -n auto --dist loadfile --durations=30
