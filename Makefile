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
