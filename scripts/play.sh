#!/usr/bin/env bash
# The main job: set up .venv (first run only) and play the shipped demo world (CoinRun, worlds/demo) on the
# embedded defaults: a gateway with the models in process and sessions in memory, serving the web play page
# at http://127.0.0.1:8080/#token=... (printed) and the gRPC API on 127.0.0.1:50051. Ctrl-C stops it.
# Extra arguments go to `genie play` (e.g. --http-port 8081 --no-browser). For a GIF instead: `genie rollout`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/genie play --world worlds/demo "$@"
