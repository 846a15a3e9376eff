#!/usr/bin/env bash
# Builds the walking CoinRun world (preset demo-walk) on this machine's CPU, from nothing to a playable, evaluated
# world directory: data from the real game, tokenizer -> LAM -> dynamics, export, eval (with the controllability
# eval against the real game, which binds the arrow keys). Re-running it resumes: finished datasets and training
# stages are skipped, an interrupted stage goes on from its newest checkpoint (every 250 steps).
#
#   bash scripts/build_walking_world.sh [OUT]        # OUT defaults to worlds/demo-walk
#
# Environment: GENIE_RUNS (training runs, default runs/demo-walk), GENIE_DATA (datasets, default data/coinrun-walk).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-worlds/demo-walk}
RUNS=${GENIE_RUNS:-runs/demo-walk}
DATA=${GENIE_DATA:-data/coinrun-walk}
[ -x .venv/bin/genie ] || bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

stamp() { date +%s; }
t0=$(stamp)
# The arrow-key "walk" policy holding each key 2-12 frames: the agent walks both ways, stands and jumps.
if [ ! -f "$DATA/train/index.json" ]; then
    rm -rf "$DATA/train"  # a dataset without its index was interrupted: its shards are redone
    genie data generate --policy walk --hold 2-12 --episodes 800 --max-frames 300 --workers 2 --quiet \
        --out "$DATA/train"
fi
if [ ! -f "$DATA/val/index.json" ]; then
    rm -rf "$DATA/val"
    genie data generate --policy walk --hold 2-12 --split val --episodes 48 --max-frames 300 --workers 2 --quiet \
        --out "$DATA/val"
fi
echo "data: $(( $(stamp) - t0 )) s" >&2

# The LAM in two phases. Phase 1: the preset's 4,000 steps of the balanced loss. Phase 2: 3,000 more steps from its
# weights (fresh optimizer, lr 3e-4) with the loss focused on the pixels that changed (`lam.change_focus`), so a walk
# whose scroll rounds to 0 px is named by the agent's sprite. Both resume; a finished phase returns at once.
PHASE2=(--set lam.change_focus=1.0 --set train_lam.steps=3000 --set train_lam.lr=3e-4 --set train_lam.warmup_steps=100)
genie train lam --preset demo-walk --set data.path="$DATA/train" --run-root "$RUNS/lam-phase1" --quiet >/dev/null
genie train lam --preset demo-walk "${PHASE2[@]}" --set data.path="$DATA/train" --run-root "$RUNS" \
    --init "$RUNS/lam-phase1/lam/checkpoints/step_00004000" --quiet >/dev/null
echo "lam: $(( $(stamp) - t0 )) s" >&2

# Tokenizer, then the dynamics on the frozen tokenizer and phase 2's LAM (complete, so skipped here), export, eval.
# The dynamics first encodes the dataset once (the preset's train_dynamics.encode_once: $RUNS/dynamics/token-cache,
# resumable, rebuilt if the data or the frozen weights change) and trains on those tokens and latent actions.
genie world build --preset demo-walk "${PHASE2[@]}" --data "$DATA/train" --eval-data "$DATA/val" --run-root "$RUNS" \
    --out "$OUT" --drift-steps 64
echo "total: $(( $(stamp) - t0 )) s" >&2
