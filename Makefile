# lorafleet: `make serve` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel (this machine and CI). On a GPU machine, e.g.:
#   make venv TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= serve_config.yaml
PYTEST_ARGS ?=

.PHONY: venv serve stop test test-fast test-isa lint bench export-model clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	# Only for the CLIP BPE vocabulary file it ships (its own deps would pull torchvision).
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	touch $@

venv: $(VENV)/.installed

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
# (Python 3.12, x86-64): diffusers and its own requirements, pydantic (the engine's config), Pillow (images),
# open_clip_torch (only for the CLIP BPE vocabulary file it ships). Versions: the venv's. No Ray.
WHEEL_DIR ?= .whl
GPU_WHEELS := diffusers==0.42.1 importlib-metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0 pillow==13.0.0 \
	requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3 idna==3.20 \
	pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing-extensions==4.16.0 open_clip_torch==3.3.0
WHEEL_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
gpu-wheels:  ## download the GPU suite's wheels into WHEEL_DIR (< 64 MiB): see README, GPU suite
	mkdir -p $(WHEEL_DIR)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(foreach p,$(WHEEL_PLATFORMS),--platform $(p)) -d $(WHEEL_DIR) $(GPU_WHEELS)
	@total=$$(du -cb $(WHEEL_DIR)/*.whl | tail -1 | cut -f1); \
	echo "$(WHEEL_DIR): $$(ls $(WHEEL_DIR)/*.whl | wc -l) wheels, $$((total / 1048576)) MiB"; \
	test $$total -lt 67108864 || { echo "the bundle is over 64 MiB"; exit 1; }
