# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: test demo bench-gpu clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,train,zero3]"
	touch $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	TRITON_INTERPRET=1 $(VENV)/bin/retmask demo

# On a CUDA machine whose Python already has torch and triton: CUDA tests, benchmarks, report.
bench-gpu:
	bash benchmarks/gpu_run.sh

clean:
	rm -rf $(VENV) build *.egg-info runs
