"""A dynamics training step of a preset (default demo-walk) encoding its clips with the frozen tokenizer and LAM, as
the default does, against the same step on tokens and latent actions encoded ahead of time (train_dynamics.encode_once).
Random weights, one batch of random frames, the training loop's own objective and autocast; alone on the machine.

    python benchmarks/bench_encode_once.py [--preset demo-walk] [--steps 10] [--threads 2]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/bench_encode_once.py
        (torch held to its AVX2 kernels: a stand-in for the AVX2-only kind; genie.device.cpu_has_bf16 is then False,
        so the step runs in fp32 as there)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from genie.data.source import VideoBatch
from genie.presets import get_preset
from genie.train import loop
from genie.train.checkpoint import build_model
from genie.train.token_cache import TokenBatch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo-walk")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    world = get_preset(args.preset)
    cfg, data = world.train_dynamics, world.data
    model = build_model("dynamics", world.dynamics).train()
    tokenizer = build_model("tokenizer", world.tokenizer).eval().requires_grad_(False)
    lam = build_model("lam", world.lam).eval().requires_grad_(False)
    objective = loop._dynamics_objective(model, tokenizer, lam, world.dynamics, cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    frames = torch.randint(0, 256, (cfg.batch_size, data.frames, data.height, data.width, 3), dtype=torch.uint8)
    with torch.no_grad():
        cached = TokenBatch(tokenizer.encode(frames), lam.infer_actions(frames))

    def step(batch, i: int) -> None:
        opt.zero_grad(set_to_none=True)
        with loop._autocast(cfg, torch.device("cpu")):
            loss, _ = objective(batch, loop._step_generator(cfg, i))
        loss.backward()
        opt.step()

    seconds: dict[str, list[float]] = {}
    for name, batch in (("encode_each_step", VideoBatch(frames, None)), ("encode_once", cached)) * 2:  # interleaved
        for i in range(2):
            step(batch, i)
        t0 = time.perf_counter()
        for i in range(args.steps):
            step(batch, i)
        seconds.setdefault(name, []).append((time.perf_counter() - t0) / args.steps)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(5):
            tokenizer.encode(frames)
            lam.infer_actions(frames)
    report = {
        "preset": args.preset, "threads": args.threads, "steps": args.steps, "machine": platform.processor() or platform.machine(),
        "capability": os.environ.get("ATEN_CPU_CAPABILITY", "native"), "bf16": cfg.bf16 and loop.cpu_has_bf16(),
        "s_per_step": {k: round(min(v), 4) for k, v in seconds.items()},
        "encodes_alone_s": round((time.perf_counter() - t0) / 5, 4),
    }
    report["step_saved"] = round(1 - report["s_per_step"]["encode_once"] / report["s_per_step"]["encode_each_step"], 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
