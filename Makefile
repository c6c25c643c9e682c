# Quick start: `make demo` (train, export, verify, search the demo model), `make test` (lint + tests, what CI runs).
# Both install what they need into the Python that PYTHON names, once per environment: a venv keeps it apart,
#   python3 -m venv .venv && . .venv/bin/activate && make demo
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --disable-pip-version-check -q
# The versions the test suite last passed on (`make constraints` rewrites it from the current environment).
CONSTRAINTS := constraints.txt
# torch (export and the demo's training), the CPU build. PyPI's Linux wheels of torch are CUDA builds of
# several GB; the CPU build is the local version +cpu, which PyPI does not serve: pip takes it from a local
# wheel cache (find-links) when there is one, else from PyTorch's CPU index. The pin admits only the CPU build,
# so a CUDA build is never pulled silently; a torch >= 2.2 already installed (a CUDA build on a GPU machine) is kept.
TORCH_VERSION := 2.13.0
TORCH := torch==$(TORCH_VERSION)$(if $(filter Linux,$(shell uname -s)),+cpu)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# One stamp per environment (sys.prefix) and set of extras: a new venv installs again.
ENV_KEY := $(shell $(PYTHON) -c "import hashlib, sys; print(hashlib.sha256(sys.prefix.encode()).hexdigest()[:12])")
ifeq ($(ENV_KEY),)
$(error PYTHON=$(PYTHON) does not run; give a Python 3.10+ interpreter, e.g. make demo PYTHON=.venv/bin/python)
endif
DEMO_EXTRAS := cpu,export
ALL_EXTRAS := cpu,export,test,bench,dev,serve,scale,cluster,openvino
DEMO_STAMP := .deps-demo-$(ENV_KEY).stamp
STAMP := .deps-all-$(ENV_KEY).stamp
# `make test-lowest`: the lowest versions pyproject.toml allows, in their own venv (ray, ruff and torch excepted:
# see .ci/lowest.py).
# Under build/: ignored by git and by ruff.
LOWEST_VENV := build/venv-lowest

.PHONY: deps demo-deps demo lint format test test-all test-lowest constraints bench clean

define install_torch
	@$(PYTHON) -c "import sys; sys.exit(sys.prefix == sys.base_prefix)" || echo "note: installing into \
	$$($(PYTHON) -c 'import sys; print(sys.prefix)'), not a venv (python3 -m venv .venv && . .venv/bin/activate)"
	@$(PYTHON) -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 2))" \
	2>/dev/null || { echo "installing $(TORCH)"; $(PIP) -c $(CONSTRAINTS) "$(TORCH)" 2>/dev/null || { echo "$(TORCH): \
	not in a local wheel cache, from $(TORCH_INDEX)"; $(PIP) -c $(CONSTRAINTS) --extra-index-url $(TORCH_INDEX) "$(TORCH)"; }; }
endef

$(DEMO_STAMP): pyproject.toml $(CONSTRAINTS)
	$(install_torch)
	$(PIP) -c $(CONSTRAINTS) -e ".[$(DEMO_EXTRAS)]"
	@touch $@

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(install_torch)
	$(PIP) -c $(CONSTRAINTS) -e ".[$(ALL_EXTRAS)]"
	@touch $@

demo-deps: $(DEMO_STAMP)
deps: $(STAMP)

demo: demo-deps
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

# The fast tests on the lowest versions pyproject.toml allows (a fresh venv of its own; a few minutes of installs).
test-lowest:
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(PYTHON) .ci/lowest.py --torch "$(TORCH)" > $(LOWEST_VENV)/lowest.txt
	$(MAKE) --no-print-directory PYTHON=$(LOWEST_VENV)/bin/python CONSTRAINTS=$(LOWEST_VENV)/lowest.txt \
		ALL_EXTRAS=cpu,export,test,bench,serve,scale deps
	$(LOWEST_VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

constraints:
	$(PYTHON) .ci/lowest.py --freeze > $(CONSTRAINTS)

bench: deps
	$(PYTHON) bench/latency.py --json bench/results/latency.json --plots bench/results

clean:
	rm -rf demo engines/*.onnx engines/*.plan engines/*.json .deps-*.stamp $(LOWEST_VENV)
