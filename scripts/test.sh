#!/usr/bin/env bash
# Runs the test suite in the project's virtual environment (set up by scripts/setup.sh --test).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q "$@"
