# mimkit: `make demo` and `make test` work on a fresh clone; both create .venv in the repo root.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# A local torch wheel (e.g. a CPU build in /opt/wheels) is used when present; otherwise torch comes from the index.
TORCH_SPEC ?= $(or $(firstword $(wildcard /opt/wheels/torch-*.whl)),torch)
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	# keep the installed torch: torchvision must match it exactly, and must not pull another torch build
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mimkit demo --output runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check mimkit tests scripts
	$(VENV)/bin/ruff format --check mimkit tests scripts
	$(VENV)/bin/mypy

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not integration"

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
