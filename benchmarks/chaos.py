"""Chaos soak: 2 `genie serve` gateways on a Sentinel-backed Redis (1 master, 1 replica, 3 sentinels) and a
tritonserver; N sessions step for `--duration` seconds from clients that retry retryable codes on the other
gateway, while a gateway, the Redis master and Triton are each kill -9'd `--kills` times (and restarted).
One row: acknowledged steps lost, sessions corrupted, duplicate step numbers, heal time per fault kind.
The harness is harness/chaos.py; tests/services/gateway/test_chaos.py runs a 45 s version.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from common import base_parser, emit, setup_run

from harness.chaos import ChaosConfig, run_chaos

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--world", type=Path, default=ROOT / "worlds" / "demo")
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of stepping")
    p.add_argument("--kills", type=int, default=3, help="kills of each kind")
    p.add_argument("--think", type=float, default=0.2, help="seconds a session pauses between steps")
    p.add_argument("--sampling-steps", type=int, default=2)
    args = p.parse_args()
    machine = setup_run(args)
    # Every process of the cluster runs from the repository root: the Triton stubs find this checkout's `genie`
    # through the working directory (from benchmarks/ they would import whichever copy the venv has installed).
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory(prefix="genie-chaos-") as root:
        cfg = ChaosConfig(world=args.world, root=Path(root), sessions=args.sessions, duration_s=args.duration,
                          kills=args.kills, think_s=args.think, sampling_steps=args.sampling_steps)
        result = asyncio.run(run_chaos(cfg))
    emit({"bench": "chaos", "world": args.world.name, "think_s": args.think, "sampling_steps": args.sampling_steps,
          "kills_each": args.kills, **result.to_dict()}, machine, args.out)


if __name__ == "__main__":
    main()
