# Two commands on a fresh machine: `make demo` and `make test`.
# torch is pinned here (not in pyproject) so CPU machines never pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
NPROC ?= 4

.PHONY: demo test test-slow bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" numpy
	$(PY) -m pip install -q -e ".[dev,deepspeed,eval,tensorboard]"
	touch $@

demo: $(VENV)/.installed
	$(PY) launch/demo.py

# Lint, types, then the suite on two pytest workers (each test's torch runs one thread).
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy megamoe
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests

# The tests marked slow: further layouts, options and fault moments of classes `make test` already
# covers. One worker: their fault injections time processes against timeouts.
test-slow: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slow tests

bench: $(VENV)/.installed
	$(PY) benchmarks/moe_layer.py

# The GPU path, with the Python that has your CUDA torch (the image's, or PYTHON=...), not the CPU venv.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf runs demo_data .pytest_cache
