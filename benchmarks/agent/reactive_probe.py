"""Probes of the reactive expert's DAgger (genie/agent/reactive.py): how good its labelling planner is, where its
student goes wrong, and what a change of the student's training does, without a new DAgger run each time.

    # the labelling planner alone (DAgger's iteration 0) on the first 96 train levels, one line per setting
    python benchmarks/agent/reactive_probe.py planner --episodes 96 --set horizon=24 --set horizon=48
    # a fresh student trained on the labels of a run's first 3 iterations, with a changed setting
    python benchmarks/agent/reactive_probe.py retrain --run runs/agent/reactive --iterations 3 \\
        --set critical_weight=2.0 --out runs/agent/probe-cw2
    # its near-optimal accuracy, overall and on the critical frames, on an iteration's labels
    python benchmarks/agent/reactive_probe.py accuracy --policy runs/agent/probe-cw2 --labels runs/agent/reactive/iteration_3
    # its success on held-out test levels, sampling at each temperature (0: argmax); --split val to choose between
    # runs or checkpoints without looking at the test levels, --mode hard for CoinRun's hard distribution
    python benchmarks/agent/reactive_probe.py play --policy runs/agent/probe-cw2 --levels 100 --temperatures 1,0.5,0

Each prints one JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genie.agent.eval import AgentEvalConfig, play, summarise
from genie.agent.policy import Policy, context_frames
from genie.agent.reactive import (
    ReactiveConfig,
    _examples,
    _in_workers,
    critical_rows,
    load_reactive_policy,
    rollout,
    save_policy,
    train_student,
)
from genie.config import apply_overrides, from_dict


def planner(args) -> None:
    for setting in args.set or [""]:  # none: the defaults
        cfg = apply_overrides(ReactiveConfig(episodes=args.episodes, seed=args.seed), [setting] if setting else [])
        t0 = time.perf_counter()
        # DAgger's iteration 0: the planner plays every frame (no student weights), in DAgger's own worker processes
        res = [(meta["success"], len(labels)) for _, labels, _, meta in
               _in_workers(rollout, [(cfg, 0, e, None) for e in range(args.episodes)], args.workers)]
        failed = [e for e, (ok, _) in enumerate(res) if not ok]
        timeouts = [e for e in failed if res[e][1] >= cfg.max_frames - 1]
        print(json.dumps({"probe": "planner", "set": setting, "episodes": args.episodes,
                          "success": float(np.mean([ok for ok, _ in res])), "failed": failed, "timeouts": timeouts,
                          "labels": int(sum(n for _, n in res)), "seconds": round(time.perf_counter() - t0, 1)}))


def retrain(args) -> None:
    run = Path(args.run)
    cfg = apply_overrides(from_dict(ReactiveConfig, json.loads((run / "config.json").read_text())), args.set or [])
    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    policy = Policy(cfg.policy_config())
    t0 = time.perf_counter()
    acc = train_student(policy, cfg, [run / f"iteration_{i}" for i in range(args.iterations)], args.iterations - 1)
    save_policy(policy, Path(args.out))
    print(json.dumps({"probe": "retrain", "run": str(run), "iterations": args.iterations, "set": args.set,
                      "train_accuracy": acc, "out": args.out, "seconds": round(time.perf_counter() - t0, 1)}))


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if len(x) else None  # None: no such frame in the sample


def accuracy(args) -> None:
    """Argmax in the near-optimal set, on a random sample of an iteration's labelled frames."""
    policy = load_reactive_policy(Path(args.policy))
    for labels in args.labels:
        episodes, index, near = _examples([Path(labels)])
        rows = np.random.default_rng(0).choice(len(index), size=min(args.frames, len(index)), replace=False)
        hit = np.zeros(len(rows), dtype=bool)
        for part in np.array_split(np.arange(len(rows)), max(1, len(rows) // 100)):
            ctx = np.stack([context_frames(episodes[e], np.array([t]), policy.cfg.context)[0] for e, t in index[rows[part]]])
            with torch.no_grad():
                choice = policy(torch.from_numpy(ctx)).argmax(-1).numpy()  # (b,)
            hit[part] = near[rows[part], choice]
        critical = critical_rows(near)[rows]
        print(json.dumps({"probe": "accuracy", "policy": args.policy, "labels": labels, "frames": len(rows),
                          "accuracy": float(hit.mean()), "critical_share": float(critical.mean()),
                          "critical_accuracy": _mean(hit[critical]), "other_accuracy": _mean(hit[~critical])}))


def play_levels(args) -> None:
    policy = load_reactive_policy(Path(args.policy))
    cfg = AgentEvalConfig(levels=args.levels, seed=args.seed, split=args.split, distribution_mode=args.mode)
    for temperature in (float(t) for t in args.temperatures.split(",")):
        def choose(ctx: torch.Tensor, gen: torch.Generator, temperature: float = temperature) -> np.ndarray:
            with torch.no_grad():
                logits = policy(ctx)  # (B, A)
            if temperature == 0:
                return logits.argmax(-1).numpy()
            return torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=gen)[:, 0].numpy()

        t0 = time.perf_counter()
        episodes = play(choose, policy.cfg.context, cfg, tag=4)  # tag 4: the reactive expert's row of `genie agent eval`
        s = summarise(episodes)
        stuck = sum(not e["success"] and e["length"] >= cfg.max_frames - 1 for e in episodes)
        print(json.dumps({"probe": "play", "policy": args.policy, "temperature": temperature, "levels": args.levels,
                          "split": args.split, "mode": args.mode, "seed": args.seed, "success": s["success_rate"],
                          "success_ci95": s["success_ci95"],
                          "timeouts": int(stuck), "mean_length": s["mean_length"],
                          "seconds": round(time.perf_counter() - t0, 1)}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="probe", required=True)
    a = sub.add_parser("planner")
    a.add_argument("--episodes", type=int, default=96)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--workers", type=int, default=2)
    a.add_argument("--set", action="append", help="one ReactiveConfig KEY=VALUE per line of output")
    a.set_defaults(fn=planner)
    a = sub.add_parser("retrain")
    a.add_argument("--run", required=True)
    a.add_argument("--iterations", type=int, required=True, help="train on iterations 0..N-1")
    a.add_argument("--set", action="append", help="ReactiveConfig KEY=VALUE overrides of the run's config")
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--out", required=True)
    a.set_defaults(fn=retrain)
    a = sub.add_parser("accuracy")
    a.add_argument("--policy", required=True)
    a.add_argument("--labels", nargs="+", required=True, help="DAgger iteration directories")
    a.add_argument("--frames", type=int, default=3000)
    a.set_defaults(fn=accuracy)
    a = sub.add_parser("play")
    a.add_argument("--policy", required=True)
    a.add_argument("--levels", type=int, default=100)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--temperatures", default="1")
    a.add_argument("--split", choices=["val", "test"], default="test",
                   help="val: choose between runs without looking at the test levels")
    a.add_argument("--mode", choices=["easy", "hard"], default="easy")
    a.set_defaults(fn=play_levels)
    args = p.parse_args(argv)
    torch.set_num_threads(getattr(args, "threads", 1) or 1)
    args.fn(args)


if __name__ == "__main__":
    main()
