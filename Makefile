# The README's two commands: `make demo` (install + the main job) and `make test` (install + all tests).
# Both start from a fresh clone with only Python 3.11, pip and apt, and are idempotent.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dscl-installed
FMNIST := /usr/share/datasets/fashion-mnist
SUDO   := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: demo test test-fast lint install data clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The embedded default dataset (Debian package dataset-fashion-mnist), unless DSCL_DATA points elsewhere.
data:
	@if [ -n "$$DSCL_DATA" ] || [ -f $(FMNIST)/t10k-labels-idx1-ubyte.gz ]; then \
	  echo "Fashion-MNIST: found"; \
	else \
	  echo "Fashion-MNIST: installing the Debian package dataset-fashion-mnist"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: install data
	$(BIN)/dscl run

test: install data
	$(BIN)/python -m pytest -q

test-fast: install data
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

clean-venv:
	rm -rf $(VENV)
