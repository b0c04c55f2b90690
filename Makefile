# torchrig: every target is a thin call into a Python CLI; `make help` lists them.
# Variables (GPUS, CONFIG, STEPS, ...) reach python3 -m env.rig.runtime untouched: it reads them from the
# MAKEFLAGS that make hands every recipe (where make keeps them quoted), checks them against its one
# table (env/rig/runtime.py MAKE_VARS), picks the runtime (docker or local) and runs the job. This file
# never expands a variable given on the command line, so a `$(shell ...)`, a `$x` or a quote in a
# value is passed byte for byte and never run; see README.md for each variable.

.DEFAULT_GOAL := help
# make would expand every command-line variable into each recipe's environment (running any
# $(shell ...) in it): they are unexported, and this file's own names cannot be set from outside.
override COMMAND_LINE_VARS := $(strip $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v))))
unexport $(COMMAND_LINE_VARS)
# The script targets (test-current, test-image, lint, lock) read their settings from the environment.
override SCRIPT_ONLY = $(if $(COMMAND_LINE_VARS),$(error make $@ takes no variables ($(COMMAND_LINE_VARS)): set them in the environment, e.g. DOCKER=/usr/bin/docker make $@))
override SHELL := /bin/bash
override DISPATCH = python3 -m env.rig.runtime --from-make $@

.PHONY: help setup build doctor nccl-test train plan bench compare prepare eval sample export keys shell test test-current test-image lint lock clean
.PHONY: slurm-train slurm-nccl-test test-slurm

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-11s %s\n", $$1, $$2}' Makefile

setup: ## make .venv from requirements.txt (done automatically on first use)
	@python3 -m env.rig.runtime setup RUNTIME=local

build: ## build the image (CUDA=12.1, the default, or 12.4/12.6/12.8; CA_BUNDLE)
	@$(DISPATCH)

doctor: ## check this box: driver, torch stack, shm, PCIe, P2P (GPUS, JSON=path, RUN_DIR)
	@$(DISPATCH)

nccl-test: ## collective bandwidth + correctness with a verdict (GPUS, SIZES, DTYPE, OPS, MIN_BUSBW, JSON, RUN_DIR, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, MAX_RESTARTS, MASTER_WAIT)
	@$(DISPATCH)

train: ## train a model (GPUS, CONFIG, STEPS, MICRO_BATCH, ACCUM, PRECISION, STRATEGY, SEED, RUN_DIR, ARGS, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, MAX_RESTARTS, MASTER_WAIT)
	@$(DISPATCH)

plan: ## whether a run fits a box's GPUs: memory per GPU by kind, a verdict, the levers (CONFIG, GPUS=N, VRAM=24, MICRO_BATCH, STRATEGY, PRECISION, JSON=path, ARGS)
	@$(DISPATCH)

bench: ## the 1->N GPU scaling table (GPUS, CONFIG, STEPS, MICRO_BATCH, ACCUM, PRECISION, STRATEGY, SEED, RUN_DIR, ARGS, BASELINE, NCCL_JSON, COUNTS, LINK)
	@$(DISPATCH)

compare: ## compare two runs' manifests and figures, and overlay their losses in a PNG (A=run_dir B=run_dir OUTPUT=png)
	@$(DISPATCH)

prepare: ## text, JSON lines, Parquet, datasets or llm.c shards into token shards, bytes or BPE; chat with a mask (INPUT='corpus/*.jsonl.zst' OUTPUT=data/x.bin TOKENIZER=bpe VOCAB=8192 TEXT_FIELD=text PROCS=4 SHARD_TOKENS=100000000 SHARD_FORMAT=llmc FORCE=1 CHAT=1 SEQ_LEN=2048 CHAT_TEMPLATE=file.jinja ALONE=1)
	@$(DISPATCH)

eval: ## validation loss of a run's newest valid checkpoint (RUN_DIR, DATA=path, GPUS, MICRO_BATCH)
	@$(DISPATCH)

sample: ## text from a run or export (RUN_DIR, PROMPT, TOKENS, TEMPERATURE, TOP_K, TOP_P, SEED, CACHE, SPECULATE)
	@$(DISPATCH)

export: ## a run's weights as a Hugging Face model directory, a LoRA run's as a PEFT adapter (RUN_DIR, OUTPUT=dir, DTYPE=fp32|bf16, SHARD=5GB, FORCE=1, MERGE=1)
	@$(DISPATCH)

keys: ## every config key with its type, default and docstring (docs/config.md is this list; OUTPUT=path writes it)
	@$(DISPATCH)

shell: ## a shell in the chosen runtime
	@$(DISPATCH)

slurm-train: ## sbatch env/slurm/train.sbatch, RUNTIME=local|docker|pyxis (NNODES, GPUS, CONFIG, STEPS, MICRO_BATCH, ACCUM, PRECISION, STRATEGY, SEED, RUN_DIR, MAX_RESTARTS, ARGS)
	@$(DISPATCH)

slurm-nccl-test: ## sbatch env/slurm/nccl-test.sbatch across nodes (NNODES, GPUS, SIZES, DTYPE, OPS, MIN_BUSBW, JSON, RUN_DIR)
	@$(DISPATCH)

test: ## the CPU test suite (gloo, several processes) in .venv
	@python3 -m env.rig.runtime setup RUNTIME=local
	@.venv/bin/python -m pytest -q

test-current: ## the test suite against the newest torch (unpinned), in .build/current-venv
	@$(SCRIPT_ONLY)
	@bash env/ci/test_current.sh

test-image: ## build the image on a local base and test it through compose (needs root, installs Docker)
	@$(SCRIPT_ONLY)
	@bash env/ci/image_test.sh

test-slurm: ## a real two-node Slurm cluster on this machine, and env/slurm/ tested on it (needs root)
	@$(SCRIPT_ONLY)
	@bash env/ci/slurm_check.sh

lint: ## hadolint, shellcheck, compose config (v1 and v2), ruff
	@$(SCRIPT_ONLY)
	@bash env/ci/lint.sh

lock: ## regenerate requirements.txt and the CUDA profile locks
	@$(SCRIPT_ONLY)
	@bash env/profiles/lock.sh

clean: ## remove caches and .venv (keeps runs/ and data/)
	rm -rf .venv .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
