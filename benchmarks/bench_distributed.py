"""Data-parallel training throughput: samples/s of genie.train.loop.train at 1 and 2 processes (torchrun, gloo).

Each configuration is (processes, torch threads per process); the defaults compare 1x1, 1x2 and 2x1 on a 2-core
machine, so "2x1 vs 1x2" is the same cores used by DDP instead of intra-op threads. A step is the whole loop
step (sprites data for the preset's model config, forward, backward, all-reduce, clip, AdamW) with the preset's
global batch; checkpoints and TensorBoard are off the timed steps. Rows carry the speedup over 1x1 and the
scaling efficiency speedup / (processes * threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import _cpu_jiffies, base_parser, emit, machine_info, rounded

HERE = Path(__file__).resolve().parent


def worker(args: argparse.Namespace) -> None:
    """One process of a timed run (under torchrun when --procs > 1); rank 0 writes the step timestamps."""
    import torch

    from genie.config import apply_overrides
    from genie.presets import get_preset
    from genie.train.loop import train

    torch.set_num_threads(args.threads)
    world = get_preset(args.preset)
    world = replace(world, data=replace(world.data, source="sprites", path="", eval_path=""))  # no dataset needed
    steps = args.warmup + args.steps
    world = apply_overrides(world, [f"train_{args.kind}.steps={steps}", f"train_{args.kind}.ckpt_every={steps}"])
    stamps: list[float] = []
    train(args.kind, world, Path(args.run_dir), progress=False, tensorboard=False,
          on_step=lambda done, logs: stamps.append(time.perf_counter()) and None)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.result).write_text(json.dumps({"stamps": stamps, "batch": world.train_config(args.kind).batch_size}))


def timed_run(args: argparse.Namespace, procs: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        script = [str(Path(__file__).resolve()), "--worker", "--preset", args.preset, "--kind", args.kind,
                  "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(threads),
                  "--run-dir", str(Path(tmp) / "run"), "--result", str(result)]
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"] if procs > 1 else [
            sys.executable]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
        start, children0 = _cpu_jiffies(), _children_s()
        subprocess.run(launch + script, check=True, env=env, cwd=HERE.parent, timeout=3600)
        end, children1 = _cpu_jiffies(), _children_s()
        data = json.loads(result.read_text())
    stamps = data["stamps"][args.warmup - 1 :]  # the timed steps start after the warm-up steps' last stamp
    times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    s = statistics.median(times)
    others = None
    if start is not None and end is not None and end[2] > start[2]:  # busy cores not spent by our run (whole run)
        busy_s = (end[0] - start[0]) / os.sysconf("SC_CLK_TCK")
        others = max(0.0, (busy_s - (children1 - children0)) / (end[2] - start[2]))
    return {"batch": data["batch"], "s_per_step": s, "samples_per_s": data["batch"] / s, "mean_s": statistics.fmean(times),
            "min_s": min(times), "max_s": max(times), "n": len(times), "others_cores": others}


def _children_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--kind", default="tokenizer", choices=("tokenizer", "lam"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--configs", nargs="+", default=["1x1", "1x2", "2x1"], help="PROCSxTHREADS")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.warmup < 1:
        raise SystemExit("--warmup must be >= 1 (the first stamp ends the first step)")
    machine = machine_info()
    base = None
    for config in args.configs:
        procs, threads = (int(x) for x in config.split("x"))
        timing = timed_run(args, procs, threads)
        base = base or (timing["samples_per_s"] if (procs, threads) == (1, 1) else None)
        row = {"bench": "train_distributed", "preset": args.preset, "model": args.kind, "procs": procs,
               "threads_per_proc": threads, "backend": "gloo" if procs > 1 else "none", **timing}
        if base:
            row["speedup_vs_1x1"] = timing["samples_per_s"] / base
            row["scaling_efficiency"] = row["speedup_vs_1x1"] / (procs * threads)
        emit(rounded(row), machine, args.out)


if __name__ == "__main__":
    main()
