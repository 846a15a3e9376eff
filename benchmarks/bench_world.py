"""World.step speed: ms per generated frame at B=1 and B=16, with and without the history (K/V) cache.

Weights are random (untrained): a step does the same work whatever the weights, so timings hold for
trained worlds. Each configuration starts from a prompt of `keep_frames` clips and takes one warm-up step
(its model FLOPs counted with FlopCounterMode). At B=1 it then times `window - keep` steps: one full
steady-state cycle of a long session, context 9..15 frames plus one window slide (rebuild from the kept
frames); at B>1 as many of those steps as fit --budget-s (at least 3). `ms_per_frame` is the median step
(a typical step) per session; `ms_per_frame_amortized` the mean over a full cycle, slide included.

Also: a history-length sweep at B=1 (the same step repeated at context 1, 2, 4, 8, 15 frames, with the
cache restored before each call vs recomputed from tokens), and for "peer-small" the speedup over jasmine.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from common import Timing, base_parser, count_flops, emit, gpu_matmul_peak, matmul_peak, rounded, setup_run, sprites_for, time_it
from torch.profiler import ProfilerActivity, profile

from genie.config import apply_overrides
from genie.models.dynamics import DynamicsModel
from genie.models.tokenizer import VideoTokenizer
from genie.presets import PRESETS, get_preset
from genie.sampling import World

FPS_TARGET, JASMINE_SPEEDUP_TARGET, PEAK_TARGET = 12.0, 20.0, 0.35  # issue 15, for the 2-core AVX2 EPYC


class Bench:
    def __init__(self, preset: str, sampling_steps: int, device: str, precision: str, fixed_shapes: bool,
                 overrides: list[str]) -> None:
        self.preset, self.device, self.precision, self.fixed_shapes = preset, device, precision, fixed_shapes
        cfg = apply_overrides(get_preset(preset), overrides)
        self.sampling = cfg.sampling
        if sampling_steps:
            self.sampling = dataclasses.replace(cfg.sampling, steps=sampling_steps)
        torch.manual_seed(0)
        self.tokenizer = VideoTokenizer(cfg.tokenizer)
        self.dynamics = DynamicsModel(cfg.dynamics)
        self.clips = sprites_for(cfg).batch(0, 16).frames  # (16, T, H, W, 3) uint8
        self.base = {"preset": preset, "overrides": overrides, "sampling_steps": self.sampling.steps, "weights": "random-init",
                     "device": device, "precision": precision, "fixed_shapes": fixed_shapes,
                     "tokens_per_frame": cfg.dynamics.tokens_per_frame, "dynamics_dim": cfg.dynamics.transformer.dim,
                     "dynamics_depth": cfg.dynamics.transformer.depth}
        engine = self.world(False).engine  # resolves the device and precision (and moves the models there)
        self.engine_device, self.engine_dtype = engine.device, engine.dtype

    def world(self, cached: bool) -> World:
        return World(self.tokenizer, self.dynamics, self.sampling, cache_bytes=1 << 30 if cached else 0,
                     device=self.device, precision=self.precision, fixed_shapes=self.fixed_shapes)

    def prompts(self, batch: int, frames: int) -> torch.Tensor:
        """(batch, frames, H, W, 3) uint8: the sprite clips, repeated for batches larger than their 16."""
        return self.clips[torch.arange(batch) % self.clips.shape[0], :frames]

    def actions(self, batch: int, step: int) -> list[int]:
        return [(step + i) % self.dynamics.cfg.num_actions for i in range(batch)]

    def steady(self, batch: int, cached: bool, iters: int, budget_s: float) -> dict:
        """Steady-state play: warm-up step (FLOPs counted) then up to a full window cycle of timed steps."""
        world = self.world(cached)
        states, _ = world.reset(self.prompts(batch, world.keep), seeds=list(range(batch)))
        misses0 = world.cache_counts[1]  # reset builds each new session's caches: those are misses by design
        t0 = time.perf_counter()
        flops, (states, _) = count_flops(lambda: world.step(states, self.actions(batch, 0)))
        first_s = time.perf_counter() - t0
        cycle = world.window - world.keep
        n = iters or (cycle if batch == 1 else max(3, min(cycle, int(budget_s / first_s))))
        k = iter(range(1, 1 << 30))
        slides = 0

        def step() -> None:
            nonlocal states, slides
            slides += states[0].tokens.shape[0] == world.window  # all rows have the same length here
            states, _ = world.step(states, self.actions(batch, next(k)))

        timing = time_it(step, iters=n, warmup=0)
        if cached:
            # a slide changes the context, so it rebuilds both caches of every row: the only misses allowed
            misses = world.cache_counts[1] - misses0
            assert misses == 2 * batch * slides, f"expected {2 * batch * slides} misses, got {misses}"
        mean, med = timing.mean, timing.median
        return {
            **self.base,
            "bench": "world_step",
            "batch": batch,
            "cache": cached,
            **timing.summary(),
            "full_cycle": n >= cycle,
            "ms_per_frame": 1e3 * med / batch,  # per session, a typical step
            "ms_per_frame_amortized": 1e3 * mean / batch if n >= cycle else None,  # slide included
            "fps_per_session": 1 / med,
            "fps_aggregate": batch / med,
            "gflop_per_step": flops / 1e9,
            "gflops": flops / med / 1e9,
        }

    def at_length(self, length: int, cached: bool, reps: int) -> Timing:
        """Times one B=1 step taken from a context of `length` frames (no slide), `reps` times."""
        world = self.world(cached)
        states, _ = world.reset(self.clips[:1, :length], seeds=[0])
        action = self.actions(1, 0)
        setup = None
        deltas = []
        if cached:

            def setup() -> None:  # rebuild what each step consumes (the step moves the slots on to its new state)
                world.engine.prime(states)
                world.decoder.decode_last(states)

        def step() -> None:
            before = world.cache_counts
            world.step(states, action)
            deltas.append(tuple(b - a for a, b in zip(before, world.cache_counts, strict=True)))

        timing = time_it(step, iters=reps, warmup=1, setup=setup)
        if cached:  # two hits (dynamics, decoder) and no miss in every call
            assert set(deltas) == {(2, 0)}, f"the sweep must hit the cache, got (hits, misses) {set(deltas)}"
        return timing

    def profile_step(self, batch: int, rows: int) -> None:
        world = self.world(True)
        states, _ = world.reset(self.prompts(batch, world.keep), seeds=list(range(batch)))
        states, _ = world.step(states, self.actions(batch, 0))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for k in range(3):
                states, _ = world.step(states, self.actions(batch, k + 1))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), file=sys.stderr)


def jasmine_ms_per_frame(path: Path) -> dict[int, float]:
    """MaskGIT steps -> jasmine's jitted ms per generated frame (the best call) from run_baseline.sh's sample.json."""
    try:
        runs = json.loads(path.read_text())["runs"]
        return {int(r["maskgit_steps"]): float(r["jit_ms_per_frame_min"]) for r in runs}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        sys.exit(f"error: cannot read jasmine's results {path}: {exc}")


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--jasmine-results", type=Path,
                        help="jasmine's sample.json from ../shared/peers/jasmine/run_baseline.sh run on THIS machine: "
                             "peer-small rows then carry speedup_vs_jasmine (jitted sampler, ms per frame by MaskGIT "
                             "steps); without it no ratio is printed, as a figure from another machine is not one")
    parser.add_argument("--sampling-steps", type=int, default=0, help="MaskGIT steps per frame (0 = the preset's)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--modes", nargs="+", default=["cache", "nocache"], choices=["cache", "nocache"])
    parser.add_argument("--iters", type=int, default=0, help="timed steps (0 = a window cycle, or --budget-s)")
    parser.add_argument("--budget-s", type=float, default=90.0, help="timed seconds per B>1 configuration")
    parser.add_argument("--sweep", type=int, nargs="*", default=[1, 2, 4, 8, 15], help="context lengths; none = skip")
    parser.add_argument("--sweep-reps", type=int, default=5)
    parser.add_argument("--profile", type=int, default=0, help="print the top N ops of 3 cached B=1 steps")
    parser.add_argument("--peak-gflops", type=float, default=0.0, help="skip measuring the matmul peak")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"])
    parser.add_argument("--fixed-shapes", action="store_true", help="attention over the whole window, masked")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="dotted world-config override, e.g. dynamics.transformer.depth=12 (a paper-size world)")
    args = parser.parse_args()
    machine = setup_run(args)
    jasmine_ms = jasmine_ms_per_frame(args.jasmine_results) if args.jasmine_results else {}
    bench = Bench(args.preset, args.sampling_steps, args.device, args.precision, args.fixed_shapes, args.overrides)
    on_gpu = bench.engine_device.type == "cuda"
    precision = "bfloat16" if bench.engine_dtype == torch.bfloat16 else "float32"
    # the % of peak compares with the matmul peak of the step's own precision on its own device, measured now
    peak = args.peak_gflops or (gpu_matmul_peak(precision, tf32=False) if on_gpu else matmul_peak())
    print(f"# {precision} matmul peak {peak:.1f} GFLOP/s on {bench.engine_device}", file=sys.stderr, flush=True)

    if args.profile:
        bench.profile_step(1, args.profile)
    b1_cost = {}
    for batch in args.batch_sizes:
        for mode in args.modes:
            row = bench.steady(batch, mode == "cache", args.iters, args.budget_s)
            row["peak_gflops"], row["of_peak"] = peak, row["gflops"] / peak
            row["target_of_peak_met"] = row["of_peak"] >= PEAK_TARGET
            if batch == 1:
                b1_cost[mode] = row["ms_per_frame"]
                if args.preset == "demo":
                    row["target_10fps_met"] = row["fps_per_session"] >= FPS_TARGET
            elif mode in b1_cost:
                row["per_session_vs_b1"] = row["ms_per_frame"] / b1_cost[mode]
                row["target_batching_met"] = row["per_session_vs_b1"] <= 1.0
            jasmine = jasmine_ms.get(bench.sampling.steps) if args.preset == "peer-small" else None
            if jasmine is not None and batch == 1:
                row["jasmine_ms_per_frame"], row["speedup_vs_jasmine"] = jasmine, jasmine / row["ms_per_frame"]
                row["jasmine_results"] = str(args.jasmine_results)
                row["target_20x_met"] = row["speedup_vs_jasmine"] >= JASMINE_SPEEDUP_TARGET
            emit(rounded(row), machine, args.out)

    sweep = {}
    window = bench.dynamics.cfg.max_frames
    for length in sorted({min(n, window - 1) for n in args.sweep or []}):  # window - 1: the longest without a slide
        cached = bench.at_length(length, True, args.sweep_reps)
        uncached = bench.at_length(length, False, args.sweep_reps)
        sweep[length] = cached.median
        row = {**bench.base, "bench": "world_history", "batch": 1, "context_frames": length, "n": args.sweep_reps}
        row |= {"ms_cache": 1e3 * cached.median, "ms_nocache": 1e3 * uncached.median}
        row |= {"ms_cache_min": 1e3 * min(cached.times), "ms_nocache_min": 1e3 * min(uncached.times)}
        row |= {"nocache_over_cache": uncached.median / cached.median}
        row["others_cores"] = max(x or 0.0 for x in (cached.others_cores, uncached.others_cores))
        emit(rounded(row), machine, args.out)
    if len(sweep) > 1:
        lo, hi = min(sweep), max(sweep)
        row = {**bench.base, "bench": "world_history_flatness", "from_frames": lo, "to_frames": hi}
        row["cache_ms_ratio"] = sweep[hi] / sweep[lo]  # 1.0 = flat in history length
        emit(rounded(row), machine, args.out)


if __name__ == "__main__":
    main()
