#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs Genie with its dev tools. Idempotent; safe on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned to 2.13.0 so pip takes the local CPU wheel instead of downloading a CUDA build.
.venv/bin/python -m pip install -q -e '.[dev]'
