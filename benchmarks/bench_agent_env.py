"""WorldVectorEnv vs World.step: aggregate frames/s of the same batch of sessions, the same prompts, seeds and actions.

Each repetition times S steps of B sessions from a fresh reset twice, interleaved: once as `World.step(states,
actions)` directly and once as `WorldVectorEnv.step(actions)` (one batched engine call per step, plus the env's
action checks and frame copies). Both use one World with a history (K/V) cache. Target: env >= 0.9x World.step.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from common import base_parser, emit, rounded, setup_run

from genie.envs import InProcessEngine, WorldVectorEnv, load_engine


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--world", default="worlds/demo")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=12, help="steps per timed block")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    machine = setup_run(args)
    engine, prompts = load_engine(args.world)
    world = engine.world
    for b in args.batch_sizes:
        rng = np.random.default_rng(b)
        actions = rng.integers(0, engine.num_actions, size=(args.steps, b))
        venv = WorldVectorEnv(b, engine=InProcessEngine(world), prompts=prompts, max_steps=10_000)
        chosen = prompts[np.arange(b) % len(prompts)]
        _, info = venv.reset(seed=0, options={"prompts": list(chosen)})
        seeds = [int(s) for s in info["world_seed"]]  # the direct path samples with the env's world seeds
        direct, env = [], []
        for rep in range(args.reps + 1):  # the first repetition warms up
            states, _ = world.reset(torch.from_numpy(chosen)[:, None], seeds)
            t0 = time.perf_counter()
            for a in actions:
                states, _ = world.step(states, a.tolist())
            t_direct = time.perf_counter() - t0
            venv.reset(seed=0, options={"prompts": list(chosen)})
            t0 = time.perf_counter()
            for a in actions:
                venv.step(a)
            t_env = time.perf_counter() - t0
            if rep:
                direct.append(t_direct)
                env.append(t_env)
        fps_direct = b * args.steps / statistics.median(direct)
        fps_env = b * args.steps / statistics.median(env)
        emit({"bench": "agent_vector_env", "world": args.world, "batch": b, "steps": args.steps, "reps": args.reps,
              **rounded({"world_step_fps": fps_direct, "vector_env_fps": fps_env, "ratio": fps_env / fps_direct,
                         "world_step_s": direct, "vector_env_s": env})}, machine, args.out)


if __name__ == "__main__":
    main()
