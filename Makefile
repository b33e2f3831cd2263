# One command to set up and demo, one to set up and test. Everything lands in .venv/ and data/.
#   make demo   — venv, packages, data, then suites/quick.yaml; ends with the report's path
#   make test   — venv, packages, data, then the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch 2.14.1 + torchvision 0.29.1 is a pair that imports together (a CUDA build; it runs on CPU too).
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup data demo test smoke clean-results

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

data: setup
	$(PY) bench.py data --fetch mnist fashion_mnist

demo: data
	$(PY) bench.py suites/quick.yaml --jobs 2

test: data
	$(PY) -m pytest -q

smoke: data
	$(PY) bench.py suites/smoke.yaml --no-progress

clean-results:
	rm -rf results/*.sqlite results/*.sqlite-*
