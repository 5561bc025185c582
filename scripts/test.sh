#!/usr/bin/env bash
# Runs the test suite in the project's virtual environment (set up by scripts/setup.sh --test).
set -euo pipefail
cd "$(dirname "$0")/.."
# Sleeping OpenMP workers: the tests run many threads on few cores (see kernels/__init__.py).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec .venv/bin/python -m pytest -q "$@"
