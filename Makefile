# The two set-up commands of the README:  `make demo`  and  `make test`.
# Each builds .venv on first use (torch 2.13.0 CPU first, so pip never pulls a multi-GB CUDA build).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  ?= torch==2.13.0

.PHONY: demo test test-fast install install-test clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[demo,train]"
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -e ".[demo,train,serve,test]"
	touch $@

install: $(VENV)/.base
install-test: $(VENV)/.test

demo: install
	rm -rf demo_output/run
	$(PY) -m peftkit.cli train --output_dir demo_output/run

test: install-test
	$(PY) -m pytest -q

test-fast: install-test
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo_output .pytest_cache
