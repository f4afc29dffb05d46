PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install test test-slow demo eval bench pocket clean

# torch is pinned first: the exact version takes the local CPU wheel instead of a CUDA build.
install:
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[dev]"

test: install
	$(PYTHON) -m pytest

test-slow: install
	$(PYTHON) -m pytest -m slow

bench: install
	$(PYTHON) bench/ask.py --recipe tiny
