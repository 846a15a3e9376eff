"""The ceiling of the LAM's one-to-one accuracy on a Procgen dataset (`genie.eval.ceiling`): replays the dataset's
episodes in the real game and groups the actions no labeller could tell apart from the frames.

    python benchmarks/lam_ceiling.py --split val --episodes 48 --max-frames 300 --horizon 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from genie.data.procgen import ProcgenConfig
from genie.eval.ceiling import ceiling


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the ceiling of one-to-one action accuracy on a Procgen dataset")
    p.add_argument("--split", default="val")
    p.add_argument("--episodes", type=int, default=48)
    p.add_argument("--max-frames", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", default="sticky", help="the generator's policy (sticky | walk)")
    p.add_argument("--hold", default="1-4", help="the policy's hold range, as `genie data generate --hold`")
    p.add_argument("--horizon", type=int, default=1, help="frames compared after each action (1: the frame pair)")
    p.add_argument("--labels", type=int, default=8, help="labels the labeller may use (the LAM's latent actions)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    lo, hi = (int(x) for x in args.hold.split("-"))
    cfg = replace(ProcgenConfig(), split=args.split, episodes=args.episodes, max_frames=args.max_frames,
                  seed=args.seed, policy=args.policy, hold_min=lo, hold_max=hi)
    t0 = time.perf_counter()
    report = {"config": {**vars(args), "out": None}, **ceiling(cfg, args.horizon, args.labels),
              "seconds": round(time.perf_counter() - t0, 1)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
