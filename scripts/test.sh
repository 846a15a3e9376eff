#!/usr/bin/env bash
# Sets up (if needed), lints and runs the whole test suite. Fails when no test runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
