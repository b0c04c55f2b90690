# torchrig: every target is a thin call into a Python CLI; `make help` lists them.
# Variables (GPUS, CONFIG, STEPS, ...) are handed to python3 -m env.runtime, which picks the
# runtime (docker or local), validates them, and runs the job. See README.md for each one.

.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VENV_PY := .venv/bin/python

VARS := RUNTIME GPUS CONFIG STEPS MICRO_BATCH ACCUM PRECISION STRATEGY SEED RUN_DIR ARGS \
        NNODES NODE_RANK MASTER_ADDR MASTER_PORT MAX_RESTARTS SIZES DTYPE OPS MIN_BUSBW JSON \
        BASELINE NCCL_JSON COUNTS LINK A B CUDA INPUT OUTPUT \
        PROMPT TOKENS TEMPERATURE TOP_K TOP_P CACHE SPECULATE FORCE
# NAME='value' for each variable that is set; single quotes inside values are escaped.
PASS := $(foreach v,$(VARS),$(if $($(v)),$(v)='$(subst ','\'',$($(v)))'))
DISPATCH = $(PYTHON) -m env.runtime $@ $(PASS)

.PHONY: help setup build doctor nccl-test train bench compare prepare sample export shell test test-current test-image lint lock clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-11s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: ## make .venv from requirements.txt (done automatically on first use)
	@$(DISPATCH) RUNTIME=local

build: ## build the image for CUDA=12.1 (default) or 12.4/12.6/12.8
	@$(DISPATCH)

doctor: ## check this box: driver, torch stack, shm, PCIe, P2P (JSON=path)
	@$(DISPATCH)

nccl-test: ## collective bandwidth + correctness with a verdict (GPUS, SIZES, DTYPE, OPS, MIN_BUSBW, JSON)
	@$(DISPATCH)

train: ## train (GPUS, CONFIG, STEPS, MICRO_BATCH, ACCUM, PRECISION, STRATEGY, SEED, RUN_DIR, ARGS)
	@$(DISPATCH)

bench: ## the 1->N GPU scaling table (GPUS, CONFIG, BASELINE)
	@$(DISPATCH)

compare: ## compare two runs' manifests and figures (A=run_dir B=run_dir)
	@$(DISPATCH)

prepare: ## turn text files into a token file (INPUT='corpus/*.txt' OUTPUT=data/corpus.bin)
	@$(DISPATCH)

sample: ## text from a run or export (RUN_DIR, PROMPT, TOKENS, TEMPERATURE, TOP_K, TOP_P, SEED, CACHE, SPECULATE)
	@$(DISPATCH)

export: ## a run's weights as safetensors + config.json (RUN_DIR, OUTPUT=dir, DTYPE=fp32|bf16, FORCE=1)
	@$(DISPATCH)

shell: ## a shell in the chosen runtime
	@$(DISPATCH)

test: ## the CPU test suite (gloo, several processes) in .venv
	@$(PYTHON) -m env.runtime setup RUNTIME=local
	@$(VENV_PY) -m pytest -q

test-current: ## the test suite against the newest torch (unpinned), in .build/current-venv
	@bash env/test_current.sh

test-image: ## build the image on a local base and test it through compose (needs root, installs Docker)
	@bash env/image_test.sh

lint: ## hadolint, shellcheck, compose config (v1 and v2), ruff
	@bash env/lint.sh

lock: ## regenerate requirements.txt and the CUDA profile locks
	@bash env/profiles/lock.sh

clean: ## remove caches and .venv (keeps runs/ and data/)
	rm -rf .venv .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
