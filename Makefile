# dsk — two commands: `make pipeline` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DSK    := $(VENV)/bin/dsk
STAMP  := $(VENV)/.installed

.PHONY: install pipeline test test-all bench clean-workspace

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: a local CPU wheel satisfies it (a loose spec pulls GBs of CUDA).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

pipeline: install
	$(DSK) run pipelines/default.yaml

test: install
	$(VENV)/bin/pytest -q

test-all: install
	$(VENV)/bin/pytest -q -m ''

bench: install
	$(PY) benchmarks/run_all.py

clean-workspace:
	rm -rf .dsk
