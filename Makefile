# Two entry points for a fresh machine: `make run` (the main job) and `make test` (the checks CI runs).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
EXTRAS ?= dev,datasets,plots,flower

.PHONY: run test lint install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/fedharmony run

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check lightning_fedharmony tests examples benchmarks
	$(VENV)/bin/ruff format --check lightning_fedharmony tests examples benchmarks
	$(VENV)/bin/mypy lightning_fedharmony

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache fedharmony_runs
