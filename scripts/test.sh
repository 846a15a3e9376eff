#!/usr/bin/env bash
# Sets up (if needed), lints and runs the whole test suite. Fails when no test runs.
# Services: uses the Redis on 127.0.0.1:6379 if one answers, else starts one for the run and stops it after.
# Triton servers are started by the test fixtures themselves (tests/services/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system-deps.sh
started_redis=""
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --pidfile /tmp/genie-test-redis.pid --logfile /tmp/genie-test-redis.log
    for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
    started_redis=1
fi
stop_redis() { if [ -n "$started_redis" ]; then redis-cli -h 127.0.0.1 -p 6379 shutdown nosave >/dev/null 2>&1 || true; fi; }
trap stop_redis EXIT
.venv/bin/ruff check .
# Two xdist workers (GENIE_TEST_WORKERS=0 runs in one process): about half the suite waits on servers, not the CPU.
.venv/bin/python -m pytest -n "${GENIE_TEST_WORKERS:-2}" --dist worksteal "$@"
