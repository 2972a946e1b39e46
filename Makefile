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
	# One pytest worker per core (at most 4, see tests/conftest.py); a file's tests share a worker
	# because several files build a module-scoped training run once.
	$(PY) -m pytest -q -n auto --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_aggregation.py
