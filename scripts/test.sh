#!/usr/bin/env bash
# The README's second command: install everything, then run the whole test suite.
# Extra arguments pass through to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
# pytest's exit code is kept, so "no tests collected" (5) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
