#!/usr/bin/env bash
# Set up (Fashion-MNIST, Chromium, PostgreSQL, the project with [dev]) and run the whole test suite on one thread.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export OMP_NUM_THREADS=1
lint-imports  # the architecture contract in pyproject.toml: imports point one way
python3 -m pytest "$@"
