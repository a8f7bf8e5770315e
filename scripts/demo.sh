#!/usr/bin/env bash
# The README's first command: install everything, then run the main job (`dscl run` on fmnist-lt).
# Extra arguments pass through to `dscl run`, e.g. `bash scripts/demo.sh --preset smoke`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dscl run "$@"
