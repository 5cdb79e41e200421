# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need,
# at the exact versions in constraints.txt (setup.py keeps ranges for users).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
EXTRAS := .[test,train,zero3]
LOCK := constraints.txt
# the lock also pins what pip's isolated build environment installs (setuptools)
PIN := PIP_CONSTRAINT=$(CURDIR)/$(LOCK)
LATEST := .venv-latest

.PHONY: test lint demo test-latest lock bench-gpu clean

$(STAMP): setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIN) $(PY) -m pip install -q --upgrade pip
	$(PIN) $(PY) -m pip install -q $(TORCH)
	$(PIN) $(PY) -m pip install -q -e "$(EXTRAS)"
	touch $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# settings in pyproject.toml ([tool.ruff]; the build stays setup.py)
lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	TRITON_INTERPRET=1 $(VENV)/bin/retmask demo

# The newest releases of everything but torch, in a venv of their own, then the suite: finds upstream
# drift on purpose. Not run by CI. torch is named in the same install so that the eager upgrade keeps it
# at 2.13.0 (the CPU wheel here; a newer torch would pull the CUDA build). `make lock` then writes what
# passed to the lock.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q $(TORCH)
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e "$(EXTRAS)" "$(TORCH)"
	$(LATEST)/bin/python -m pip list --format=freeze | grep -E "^(torch|triton|transformers|kernels|trl|datasets|accelerate)=="
	TRITON_INTERPRET=1 $(LATEST)/bin/python -m pytest -q tests

lock:
	@test -x $(LATEST)/bin/python || { echo "no $(LATEST): run 'make test-latest' first (the lock records what passed there)"; exit 2; }
	{ sed -n '/^#/p' $(LOCK); $(LATEST)/bin/python -m pip freeze --all --exclude-editable \
	  | grep -v '^retmask' | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > $(LOCK).new && mv $(LOCK).new $(LOCK)
	@echo "wrote $(LOCK); commit it after 'make test' passes from a fresh clone"

# On a CUDA machine whose Python already has torch and triton: CUDA tests, benchmarks, report.
bench-gpu:
	bash benchmarks/gpu_run.sh

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info runs
