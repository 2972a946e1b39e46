# Two entry points (see README): `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch from pip's index (plain PyPI on Linux: the CUDA build); README "make demo" says how to get the CPU build.
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

.PHONY: install demo test bench
install: $(STAMP)

demo: $(STAMP)
	$(PY) -m nextvlad.demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_aggregation.py
