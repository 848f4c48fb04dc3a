# The README's two commands: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp-install

.PHONY: all demo demo-vm test bench lint typecheck unit setup system clean

all: test

system:
	@PYTHON=$(PYTHON) sh tools/setup-system.sh

$(STAMP): pyproject.toml tools/setup-system.sh
	@PYTHON=$(PYTHON) sh tools/setup-system.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,tpm,postgresql]'
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	@$(VENV)/bin/cima demo

# The chain on a real kernel: a virtual machine with measured boot, IMA and a vTPM.
demo-vm: setup
	@$(PY) -m tests.vm.demo

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: setup
	$(VENV)/bin/mypy

unit: setup
	$(PY) -m pytest -q

test: lint typecheck unit

bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
