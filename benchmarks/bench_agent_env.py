"""WorldVectorEnv vs World.step: aggregate frames/s of the same batch of sessions, the same prompts, seeds and actions.

Each repetition times S steps of B sessions from a fresh reset twice, in alternating order: once as
`World.step(states, actions)` directly and once as `WorldVectorEnv.step(actions)` (one batched engine call per step,
plus the env's action checks and frame copies). Both use one World with a history (K/V) cache. Because a shared
2-core machine makes whole-run timings noisy, the env run also times its engine calls, so the env's own overhead
(env time minus engine time, as a share of env time) is reported beside the ratio. Target: env >= 0.9x World.step.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from common import OtherLoad, base_parser, emit, rounded, setup_run

from genie.envs import InProcessEngine, WorldVectorEnv, load_engine


class TimedEngine(InProcessEngine):
    """Accumulates the seconds spent inside engine.step."""

    seconds = 0.0

    def step(self, handles, actions):
        t0 = time.perf_counter()
        out = super().step(handles, actions)
        self.seconds += time.perf_counter() - t0
        return out


def bench_batch(world, prompts: np.ndarray, b: int, steps: int, reps: int) -> dict:
    actions = np.random.default_rng(b).integers(0, world.num_actions, size=(steps, b))
    timed = TimedEngine(world)
    venv = WorldVectorEnv(b, engine=timed, prompts=prompts, max_steps=10_000)
    chosen = prompts[np.arange(b) % len(prompts)]
    _, info = venv.reset(seed=0, options={"prompts": list(chosen)})
    seeds = [int(s) for s in info["world_seed"]]  # the direct path samples with the env's world seeds

    def run_direct() -> float:
        states, _ = world.reset(torch.from_numpy(chosen)[:, None], seeds)
        t0 = time.perf_counter()
        for a in actions:
            states, _ = world.step(states, a.tolist())
        return time.perf_counter() - t0

    def run_env() -> tuple[float, float]:
        venv.reset(seed=0, options={"prompts": list(chosen)})
        timed.seconds = 0.0
        t0 = time.perf_counter()
        for a in actions:
            venv.step(a)
        return time.perf_counter() - t0, timed.seconds

    direct, env, overhead = [], [], []
    with OtherLoad() as load:
        for rep in range(reps + 1):  # the first repetition warms up
            if rep % 2:
                t_env, t_engine = run_env()
                t_direct = run_direct()
            else:
                t_direct = run_direct()
                t_env, t_engine = run_env()
            if rep:
                direct.append(t_direct)
                env.append(t_env)
                overhead.append((t_env - t_engine) / t_env)
    fps_direct = b * steps / statistics.median(direct)
    fps_env = b * steps / statistics.median(env)
    return {"world_step_fps": fps_direct, "vector_env_fps": fps_env, "ratio": fps_env / fps_direct,
            "env_overhead_share": statistics.median(overhead), "world_step_s": direct, "vector_env_s": env,
            "others_cores": load.cores}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--world", default="worlds/demo")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=12, help="steps per timed block")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    machine = setup_run(args)
    engine, prompts = load_engine(args.world)
    for b in args.batch_sizes:
        row = bench_batch(engine.world, prompts, b, args.steps, args.reps)
        emit({"bench": "agent_vector_env", "world": args.world, "batch": b, "steps": args.steps, "reps": args.reps,
              **rounded(row)}, machine, args.out)


if __name__ == "__main__":
    main()
