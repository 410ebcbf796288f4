# Two entry points (see README "Quick start"): `make demo` and `make test`; `make bench` measures (bench/).
# Both create .venv on first use. TORCH picks the torch build: the default is the CPU wheel this
# project is developed with; on a CUDA machine use pixi's cuda env or `make demo TORCH=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CORES ?= all
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Rules call `python -m pipeline.<stage>`: the venv must come first on PATH, as after activating it.
IN_VENV := PATH="$(abspath $(BIN)):$$PATH"

CONFIG ?= config/config.yaml

.PHONY: setup demo test bench gpu-check wheels lint dry-run plan clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[demo,test,hf]'
	touch $@

demo: setup
	$(IN_VENV) snakemake --cores $(CORES)

test: setup
	$(IN_VENV) python -m pytest

# Every benchmark's CPU smoke run, <= 10 minutes on 2 cores: ratios and goals in results/bench/cpu.json.
# SPAMS (the extra `spams`) is the dictionary benchmark's reference.
bench: $(VENV)/.bench-installed
	$(IN_VENV) python bench/run_all.py

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[demo,test,spams]'
	touch $@

# The first command on a GPU node (bench/gpu_check.py): the GPU tests, every stage's GPU figures and the
# workflow on the GPU, 8 minutes in all; DEVICE=cpu runs the same at tiny shapes. On a node without internet,
# `make wheels` here first (WHEEL_PYTHON: the node's Python), copy .whl/ along, and give WHEELS=.whl there.
DEVICE ?= cuda
WHEELS ?=
WHEEL_PYTHON ?= 3.12
gpu-check:
	$(IN_VENV) python bench/gpu_check.py --out results/gpu-check --device $(DEVICE) $(if $(WHEELS),--wheels $(WHEELS))

wheels: setup
	$(IN_VENV) python bench/wheels.py --out .whl --python-version $(WHEEL_PYTHON)

lint: setup
	$(IN_VENV) python -m pytest -q tests/test_lint.py

dry-run: setup
	$(IN_VENV) snakemake --dry-run

# Disk and compute of every stage of $(CONFIG) on this machine, before it runs (pipeline/plan.py).
plan: setup
	$(IN_VENV) python -m pipeline.plan --configfile $(CONFIG)

clean:
	rm -rf results resources benchmarks logs .snakemake
