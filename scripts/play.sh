#!/usr/bin/env bash
# The main job: set up .venv (first run only) and play the shipped demo world (CoinRun, worlds/demo) on the CPU,
# writing play.gif. Extra arguments go to `genie play` (e.g. --steps 64 --actions 1,1,2,5 --prompt my.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/genie play --world worlds/demo "$@"
