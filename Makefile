# lorafleet: `make serve` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch: pyproject.toml's pin (the one place its version is written), installed first, in one build. The CPU
# build here and in CI, from pip's configured sources (this machine: /opt/wheels). On a GPU machine, the CUDA
# build of the same version: make venv TORCH_INDEX=https://download.pytorch.org/whl/cu128 (README, Install).
TORCH_VERSION := $(shell sed -n 's/^ *"torch==\([^"]*\)",*$$/\1/p' pyproject.toml)
TORCH_INDEX ?=
TORCH_SPEC ?= torch==$(TORCH_VERSION)$(if $(TORCH_INDEX), --index-url $(TORCH_INDEX))
# Every other runtime and dev dependency, pinned: `make lock` writes it from pyproject.toml.
LOCK := requirements.lock
CONFIG ?= serve_config.yaml
PYTEST_ARGS ?=

.PHONY: venv serve stop test test-fast test-isa lint bench export-model clean

$(VENV)/.installed: pyproject.toml $(LOCK) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# `make lock`: resolve pyproject.toml (runtime + dev) into requirements.lock for CPython 3.11 on Linux x86-64
# (manylinux_2_28, as torch's wheels), with torch's CPU build so that no CUDA package enters the lock; torch's
# line is written without its build label (+cpu), so the CUDA build of the same version satisfies it. uv keeps
# the current pins wherever they still fit, and looks at nothing uploaded after LOCK_DATE: the same inputs give
# the same file. Newer releases: make lock LOCK_DATE=<now, UTC> LOCK_UPGRADE=1.
UV ?= $(if $(wildcard $(VENV)/bin/uv),$(VENV)/bin/uv,uv)
LOCK_DATE ?= 2026-11-30T15:00:00Z
LOCK_UPGRADE ?=
# Where uv finds torch's CPU wheel: pip's own find-links where set (this machine), else PyTorch's CPU index.
TORCH_CPU_WHEELS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null),\
	https://download.pytorch.org/whl/cpu/torch/)
.PHONY: lock
lock:  ## re-resolve requirements.lock after editing pyproject.toml's dependencies (then: make venv)
	@tmp=$$(mktemp); trap 'rm -f $$tmp' EXIT; \
	if [ -f $(LOCK) ]; then sed -E 's/^(torch==[^+ ]+)$$/\1+cpu/' $(LOCK) > $$tmp; fi; \
	$(UV) pip compile pyproject.toml --extra dev --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--exclude-newer $(LOCK_DATE) $(foreach f,$(TORCH_CPU_WHEELS),--find-links $(f)) \
		$(if $(LOCK_UPGRADE),--upgrade) --custom-compile-command "make lock" --quiet -o $$tmp || exit 1; \
	if grep -qE '^(nvidia-|cuda-|triton==)' $$tmp; then echo "make lock: torch's CPU wheel not found (TORCH_CPU_WHEELS)"; exit 1; fi; \
	sed -E -e 's/^(torch==[^+ ]+)\+cpu$$/\1/' -e '2a\
#    For CPython 3.11 on Linux x86-64 (manylinux_2_28). torch: any build of this version (CPU here; CUDA: README).' \
		$$tmp > $(LOCK); \
	echo "$(LOCK): $$(grep -c '^[a-z0-9].*==' $(LOCK)) pins"

serve: venv  ## local Ray head on 127.0.0.1, the app on the embedded default; Ctrl-C stops
	$(VENV)/bin/lorafleet serve --config $(CONFIG)

stop:  ## stop a `make serve` running in another terminal
	@if [ -f .lorafleet/serve.pid ]; then kill -TERM $$(cat .lorafleet/serve.pid) && echo "stopping lorafleet"; \
	else echo "lorafleet is not running"; fi

test: venv  ## the whole suite (unit, equivalence, end-to-end through Ray Serve and HTTP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv  ## everything but the end-to-end tests
	$(PY) -m pytest -m "not e2e" $(PYTEST_ARGS)

ISA ?= all
test-isa: venv  ## invariance + equivalence tests under each forced CPU ISA, 1 and 2 threads (ISA=ci: CI's subset)
	$(PY) tests/isa_matrix.py --only $(ISA)

lint: venv
	$(VENV)/bin/ruff check .

bench: venv  ## served graph vs diffusers' pipeline in a plain loop; figures into docs/benchmarks.md by hand
	$(PY) benchmarks/bench_serving.py

.PHONY: loadtest
LOADTEST_ARGS ?=
loadtest: venv  ## lorafleet vs a plain diffusers server under locust, on 127.0.0.1: make loadtest LOADTEST_ARGS="--slo-ms 800"
	$(PY) -m loadtest.run $(LOADTEST_ARGS)

.PHONY: soak
SOAK_ARGS ?=
soak: venv  ## chaos soak on 127.0.0.1, 5 min: kills and an S3 outage under load; nothing lost or hung (make soak SOAK_ARGS=--short)
	$(PY) -m loadtest.soak $(SOAK_ARGS)

MODEL ?= builtin:tiny-sd
export-model: venv  ## write a builtin model as a diffusers directory: make export-model DIR=/tmp/tiny-sd [MODEL=builtin:tiny-sdxl]
	$(VENV)/bin/lorafleet export-model $(MODEL) $(DIR)

clean:
	rm -rf $(VENV) .lorafleet .pytest_cache

# -- #19: the prepared GPU suite ------------------------------------------------------------------
.PHONY: gpu-suite gpu-wheels
OUT ?= .lorafleet/gpu-suite
SMOKE ?=
# The venv's Python where there is one (CI, a developer's machine); on a GPU host without one, python3
# with the wheel bundle on PYTHONPATH (README: GPU suite).
SUITE_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-suite:  ## #19's GPU suite on the Ray-free engine, JSON + Markdown into OUT (SMOKE=1: all of it on the CPU, tiny models)
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(SUITE_PY) -m benchmarks.gpu_suite --out $(OUT) $(if $(SMOKE),--smoke)

# Every wheel the suite needs beyond what a GPU host with torch, transformers, peft and safetensors has
# (Python 3.12, x86-64): diffusers and its own requirements, pydantic (the engine's config), Pillow (images).
# The CLIP BPE vocabulary is lorafleet's own package data (deployments/engine/clip_bpe/). Versions: the lock's.
# No Ray.
WHEEL_DIR ?= .whl
GPU_WHEEL_NAMES := diffusers importlib-metadata zipp lazy-importer pillow requests urllib3 certifi charset-normalizer \
	idna pydantic pydantic-core annotated-types typing-inspection typing-extensions
locked = $(or $(shell sed -n 's/^$(1)==\([^ ]*\)$$/\1/p' $(LOCK)),$(error $(1) is not in $(LOCK)))
GPU_WHEELS = $(foreach n,$(GPU_WHEEL_NAMES),$(n)==$(call locked,$(n)))
WHEEL_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
gpu-wheels:  ## download the GPU suite's wheels into WHEEL_DIR (< 64 MiB): see README, GPU suite
	mkdir -p $(WHEEL_DIR)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(foreach p,$(WHEEL_PLATFORMS),--platform $(p)) -d $(WHEEL_DIR) $(GPU_WHEELS)
	@total=$$(du -cb $(WHEEL_DIR)/*.whl | tail -1 | cut -f1); \
	echo "$(WHEEL_DIR): $$(ls $(WHEEL_DIR)/*.whl | wc -l) wheels, $$((total / 1048576)) MiB"; \
	test $$total -lt 67108864 || { echo "the bundle is over 64 MiB"; exit 1; }
