# dsk — two commands: `make pipeline` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DSK    := $(VENV)/bin/dsk
STAMP  := $(VENV)/.installed

.PHONY: install browser pipeline test test-all bench clean-workspace

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

# The report test renders HTML in headless Chromium (Debian's package); install it if missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "note: could not install chromium; the browser check of the report will be skipped"; }

test: install browser
	$(VENV)/bin/pytest -q

test-all: install
	$(VENV)/bin/pytest -q -m ''

bench: install
	$(PY) benchmarks/run_all.py

clean-workspace:
	rm -rf .dsk
