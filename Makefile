# Set-up and entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv, install torch (exact pin: a local CPU wheel here; on GPU
# machines pip picks the matching CUDA build of the same version), then alambic.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
EXTRAS_TEST := dev,demo,api,serving,served,quant,merge

.PHONY: install install-test demo demo-lm test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_PIN)
	touch $@

$(VENV)/.demo: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e '.[$(EXTRAS_TEST)]'
	touch $@ $(VENV)/.demo

install: $(VENV)/.demo

install-test: $(VENV)/.test

demo: $(VENV)/.demo
	HF_HUB_OFFLINE=1 $(BIN)/alambic demo

demo-lm: $(VENV)/.demo
	HF_HUB_OFFLINE=1 $(BIN)/alambic demo --task lm

test: $(VENV)/.test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

test-fast: $(VENV)/.test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/unit

clean:
	rm -rf $(VENV) runs .pytest_cache
