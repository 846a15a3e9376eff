"""Data-parallel training throughput: samples/s of genie.train.loop.train at 1 and 2 processes (torchrun).

Each configuration is (processes, torch threads per process); the defaults compare 1x1, 1x2 and 2x1 on a 2-core
machine, so "2x1 vs 1x2" is the same cores used by DDP instead of intra-op threads. With --device cuda each process
trains on its own GPU (nccl), so PROCS can be at most the GPUs there are. A step is the whole loop step (sprites
data for the preset's model config, host-to-device copy, forward, backward, all-reduce, clip, AdamW) with the
preset's global batch (or --set train_KIND.batch_size=...); checkpoints and TensorBoard are off the timed steps.
Rows carry the speedup over 1x1, the scaling efficiency speedup / (processes * threads on CPU, processes on GPU),
and with --flops the model GFLOP of one step (FlopCounterMode, one untimed step) and the model FLOP/s this
throughput is. On a GPU the matmul peak of the step's precision (bf16, or fp32 on TF32 cores unless
train_KIND.tf32=false) is measured in the same run for the % of peak.
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

from common import _cpu_jiffies, base_parser, emit, gpu_matmul_peak, machine_info, matmul_peak, rounded

HERE = Path(__file__).resolve().parent


def bench_world(args: argparse.Namespace, steps: int):
    """The preset with --set applied, on sprites data (no dataset needed), training `steps` steps, one checkpoint."""
    from genie.config import apply_overrides
    from genie.presets import get_preset

    world = get_preset(args.preset)
    world = replace(world, data=replace(world.data, source="sprites", path="", eval_path=""))
    sets = [*args.set, f"train_{args.kind}.steps={steps}", f"train_{args.kind}.ckpt_every={steps}"]
    return apply_overrides(world, sets)


def worker(args: argparse.Namespace) -> None:
    """One process of a timed run (under torchrun when --procs > 1); rank 0 writes the step timestamps."""
    import torch

    from genie.train.checkpoint import untrained_frozen
    from genie.train.loop import train

    torch.set_num_threads(args.threads)
    world = bench_world(args, args.warmup + args.steps)
    frozen = untrained_frozen(world, Path(args.run_dir) / "frozen") if args.kind == "dynamics" else None
    stamps: list[float] = []
    waits: list[float] = []
    cuda = args.device == "cuda"

    def stamp(done: int, logs: dict) -> None:
        if cuda:
            torch.cuda.synchronize()  # the step's kernels are done, not only queued
        stamps.append(time.perf_counter())
        waits.append(logs["data_s"])

    train(args.kind, world, Path(args.run_dir) / args.kind, frozen=frozen, progress=False, tensorboard=False,
          on_step=stamp, device=args.device, data_workers=args.data_workers)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.result).write_text(json.dumps({"stamps": stamps, "waits": waits,
                                                 "batch": world.train_config(args.kind).batch_size}))


def step_gflop(args: argparse.Namespace) -> float:
    """Model GFLOP of one training step at the global batch (forward + backward), counted in this process on the
    benchmark's device (one untimed step)."""
    from common import count_flops

    from genie.train.checkpoint import untrained_frozen
    from genie.train.loop import train

    world = bench_world(args, 1)
    with tempfile.TemporaryDirectory() as tmp:
        frozen = untrained_frozen(world, Path(tmp) / "frozen") if args.kind == "dynamics" else None
        flops, _ = count_flops(lambda: train(args.kind, world, Path(tmp) / "run", frozen=frozen, progress=False,
                                             tensorboard=False, device=args.device))
    if args.device == "cuda":  # hand the step's cached blocks back: the timed run is another process on this GPU
        import torch

        torch.cuda.empty_cache()
    return flops / 1e9


def timed_run(args: argparse.Namespace, procs: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        script = [str(Path(__file__).resolve()), "--worker", "--preset", args.preset, "--kind", args.kind,
                  "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(threads),
                  "--device", args.device, "--run-dir", str(Path(tmp) / "run"), "--result", str(result),
                  *(["--data-workers", str(args.data_workers)] if args.data_workers is not None else []),
                  *[a for s in args.set for a in ("--set", s)]]
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
    data_s = statistics.median(data["waits"][args.warmup:])  # rank 0's wait for its batches in the timed steps
    others = None
    if start is not None and end is not None and end[2] > start[2]:  # busy cores not spent by our run (whole run)
        busy_s = (end[0] - start[0]) / os.sysconf("SC_CLK_TCK")
        others = max(0.0, (busy_s - (children1 - children0)) / (end[2] - start[2]))
    return {"batch": data["batch"], "s_per_step": s, "samples_per_s": data["batch"] / s, "data_s": data_s,
            "data_share": data_s / s, "mean_s": statistics.fmean(times),
            "min_s": min(times), "max_s": max(times), "n": len(times), "others_cores": others}


def _children_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--kind", default="tokenizer", choices=("tokenizer", "lam", "dynamics"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: one GPU per process, nccl")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. train_lam.batch_size=64")
    parser.add_argument("--flops", action="store_true", help="count a step's model FLOPs (one untimed step)")
    parser.add_argument("--data-workers", type=int, help="batch-building processes (default: the loop's)")
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
    import torch

    from genie.train.distributed import backend_for

    machine = machine_info()
    cuda = args.device == "cuda"
    gflop = step_gflop(args) if args.flops else None
    precision = bench_world(args, 1).train_config(args.kind)  # bf16 / tf32 as --set left them
    peak = None
    if gflop:  # the denominator of % of peak, measured in this run: the GPU's (per GPU) or the CPU's fp32 peak
        peak = gpu_matmul_peak("bfloat16" if precision.bf16 else "float32", precision.tf32) if cuda else matmul_peak()
    base = None
    for config in args.configs:
        procs, threads = (int(x) for x in config.split("x"))
        timing = timed_run(args, procs, threads)
        base = base or (timing["samples_per_s"] if (procs, threads) == (1, 1) else None)
        backend = backend_for(torch.device(args.device)) if procs > 1 else "none"
        row = {"bench": "train_distributed", "preset": args.preset, "model": args.kind, "device": args.device,
               "procs": procs, "threads_per_proc": threads, "backend": backend, "sets": args.set,
               "data_workers": args.data_workers, **timing}
        if base:
            row["speedup_vs_1x1"] = timing["samples_per_s"] / base
            row["scaling_efficiency"] = row["speedup_vs_1x1"] / (procs if cuda else procs * threads)
        if gflop:
            row["gflop_per_step"] = gflop
            row["model_gflops"] = gflop / timing["s_per_step"]
            if peak:  # per GPU, each doing 1/procs of the step; on the CPU, all processes share one peak
                row["matmul_peak_gflops"] = peak
                row["pct_of_peak"] = 100 * row["model_gflops"] / (procs if cuda else 1) / peak
        emit(rounded(row), machine, args.out)


if __name__ == "__main__":
    main()
