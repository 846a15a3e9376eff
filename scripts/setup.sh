#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs Genie with its dev tools. Idempotent; safe on a fresh machine.
# Installs only when the venv lacks Genie or pyproject.toml changed since the last install (the install is
# editable, so source changes need none); pip's output is shown only when it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.genie-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -x .venv/bin/genie ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "installing Genie into .venv (about a minute the first time)" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# torch is pinned to 2.13.0 so pip takes the local CPU wheel instead of downloading a CUDA build.
if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e '.[dev]'; } >"$log" 2>&1
then
    cat "$log" >&2
    echo "error: installing Genie into .venv failed (pip's output above)" >&2
    exit 1
fi
echo "$want" > "$stamp"
