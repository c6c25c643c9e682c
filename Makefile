# Quick start: `make demo` (train, export, verify, search the demo model), `make test` (lint + tests, what CI runs).
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --disable-pip-version-check -q
# The CPU build of torch, pinned so a fresh CPU machine does not pull a multi-GB CUDA build.
TORCH := torch==2.13.0
STAMP := .deps-$(shell $(PYTHON) -c "import sys; print(sys.version_info[0], sys.version_info[1], sep='')").stamp

.PHONY: deps demo lint format test test-all bench clean

$(STAMP): pyproject.toml
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[cpu,export,test,bench,dev,serve,scale,cluster]" "$(TORCH)"
	@touch $@

deps: $(STAMP)

demo: deps
	$(PYTHON) -m bench.demo

# ruff: one style (pyproject.toml [tool.ruff]); `make format` applies what `make lint` checks.
lint: deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: deps
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

test: lint
	$(PYTHON) -m pytest -q -m "not slow"

test-all: lint
	$(PYTHON) -m pytest -q

bench: deps
	$(PYTHON) bench/latency.py --json bench/results/latency.json --plots bench/results

clean:
	rm -rf demo engines/*.onnx engines/*.plan engines/*.json .deps-*.stamp
