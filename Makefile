# Shortcuts for the README's two commands (scripts/demo.sh and scripts/test.sh), which need only
# Python, pip and apt; `make` is a convenience on machines that have it.
.PHONY: demo test test-fast lint install

install:
	bash scripts/setup.sh

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

test-fast:
	bash scripts/test.sh -m "not slow"

lint: install
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/mypy
