# Two commands on a fresh machine:  make demo  |  make test
# Both create .venv (Python 3.11+) and install the package into it if needed.

SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CORES  ?= 8
STAMP  := $(VENV)/.installed

.PHONY: install vendor demo test test-all test-slurm test-slow clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,slurm]'
	touch $(STAMP)

## OpenSeadragon for the report's viewer, from the npm registry (pinned, hash-checked; once).
vendor: $(STAMP)
	$(BIN)/wsi-asmil vendor

install: $(STAMP) vendor

## Run the whole workflow on the built-in synthetic demo cohort (outputs in results/). Progress is
## compact; Snakemake's complete log is in .snakemake/log/ and each job's in results/logs/.
demo: $(STAMP) vendor
	set -o pipefail; PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --cores $(CORES) 2>&1 | $(BIN)/wsi-asmil console

## The default test suite (what CI runs): unit tests, real-slide tests, a tiny end-to-end run and the
## report's viewer in headless Chromium (skipped without it; CI sets WSI_ASMIL_REQUIRE_CHROMIUM=1).
test: $(STAMP) vendor
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -m "not slow and not slurm" -q

## The workflow on a real one-node Slurm cluster that the test starts on localhost (CI runs it too).
## Needs root and Debian's packages: apt-get install --no-install-recommends slurmctld slurmd
## slurm-client munge. Fails, rather than skips, when they are missing.
test-slurm: $(STAMP) vendor
	PATH=$(abspath $(BIN)):$$PATH WSI_ASMIL_REQUIRE_SLURM=1 $(BIN)/python -m pytest -m slurm -q

## The slow end-to-end tests: SIGKILL through Snakemake, a bad cohort, the 50-slide soak (CI runs them).
test-slow: $(STAMP) vendor
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -m "slow and not slurm" -q

## Everything, including the slow end-to-end tests.
test-all: $(STAMP) vendor
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q

clean-demo:
	rm -rf results .snakemake
