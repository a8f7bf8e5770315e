#!/usr/bin/env bash
# Installs everything dscl needs, idempotently: a virtual environment in .venv with dscl and its
# dev tools, and the default dataset (Debian package dataset-fashion-mnist) unless DSCL_DATA is set.
# Needs only Python >= 3.10 with venv/pip, and apt (root or sudo) for the dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.dscl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  if ! "$PYTHON" -m venv .venv; then
    echo "setup: '$PYTHON -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2
    exit 1
  fi
  .venv/bin/python -m pip install --upgrade --quiet pip
  # the distribution was named `dscl` before (an unrelated PyPI package has that name): a .venv made then
  # holds that install, which would stay next to dscl-lt with the same files and command
  .venv/bin/python -m pip uninstall --quiet -y dscl 2>/dev/null || true
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  touch "$stamp"
fi
fmnist=/usr/share/datasets/fashion-mnist
if [ -n "${DSCL_DATA:-}" ] || [ -f "$fmnist/t10k-labels-idx1-ubyte.gz" ]; then
  echo "setup: Fashion-MNIST found"
else
  echo "setup: installing the Debian package dataset-fashion-mnist (the default dataset)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist
fi
