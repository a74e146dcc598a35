# Two commands on a fresh machine:  make demo  |  make test
# Both create .venv (Python 3.11+) and install the package into it if needed.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CORES  ?= 8
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Run the whole workflow on the built-in synthetic demo cohort (outputs in results/).
demo: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --cores $(CORES)

## The default test suite (what CI runs): unit tests, real-slide tests and a tiny end-to-end run.
test: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -m "not slow" -q

## Everything, including the slow end-to-end tests.
test-all: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q

clean-demo:
	rm -rf results .snakemake
