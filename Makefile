# sectionflow: `make demo` runs the whole pipeline on the bundled real EM stack,
# `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned to the CPU build this machine ships; nothing below may replace it.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test,gpu,bench]" "torch==2.13.0"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sectionflow demo

test: $(STAMP)
	$(PY) -m ruff check .
	TRITON_INTERPRET=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m benchmarks.run_all --quick

clean-demo:
	rm -rf demo_output
