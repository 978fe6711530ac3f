#!/usr/bin/env bash
# The main job: set up, run the quick comparison suite on Fashion-MNIST into MLflow, write the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# As many workers as fit the cores (one thread each on 2 cores); prints the wall time at the end.
dmkd suite configs/quick.yaml --workers auto "$@"
