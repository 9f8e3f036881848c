# wafer-fcn: the two set-up commands are `make demo` and `make test` (see README).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned to the builds this workplace serves from local disk; elsewhere any
# torch>=2.4 works (pyproject.toml), set TORCH_SPEC= to let pip choose.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_ENABLE_TELEMETRY ?= false
export DO_NOT_TRACK ?= 1

.PHONY: demo test install bench stack-up stack-down clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo ">> installing wafer-fcn into $(VENV) (first time: a few minutes)"
	$(VENV)/bin/pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/wafer-fcn demo

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/run_all.py

stack-up: $(VENV)/.installed
	$(VENV)/bin/wafer-fcn stack up

stack-down:
	$(VENV)/bin/wafer-fcn stack down

clean:
	rm -rf var .pytest_cache
