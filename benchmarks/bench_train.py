"""Training throughput of the tokenizer, LAM and dynamics model: one step = forward + backward + clip + AdamW.

Batches are the preset's TrainConfig batch of synthetic moving-sprites clips, generated before timing (data
generation is not timed). Model FLOPs of one step are counted with FlopCounterMode on the warm-up step and
set against the fp32 matmul peak measured in the same run. For "peer-small" each row also carries jasmine's
s/step on this machine (../shared/DESIGN.md) and the speedup over it (target: >= 3x).

Models: tokenizer, lam, dynamics (on random token/action ids: the model alone), and dynamics_full (what the
training loop and jasmine run per dynamics step: frozen tokenizer encode + LAM inference, then the dynamics
step).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from common import base_parser, count_flops, emit, matmul_peak, rounded, setup_run, sprites_for, time_it
from torch import Tensor, nn

from genie.config import TrainConfig, WorldConfig
from genie.data.synthetic import MovingSprites
from genie.models.dynamics import DynamicsModel
from genie.models.lam import LatentActionModel
from genie.models.tokenizer import VideoTokenizer
from genie.presets import PRESETS, get_preset

MODELS = ("tokenizer", "lam", "dynamics", "dynamics_full")
# jasmine (the JAX Genie, commit 420859b) on this machine, "peer-small", s/step (../shared/DESIGN.md).
JASMINE_S_PER_STEP = {"tokenizer": 88.9, "lam": 3.82, "dynamics": 56.5, "dynamics_full": 56.5}
SPEEDUP_TARGET = 3.0


def build(kind: str, world: WorldConfig, batch_size: int) -> tuple[nn.Module, Callable[[int], Tensor]]:
    """The trained model and a function from a batch index to that batch's loss (forward only)."""
    sprites = sprites_for(world)
    if kind == "tokenizer":
        model = VideoTokenizer(world.tokenizer)
        return model, _video_loss(model, sprites, batch_size)
    if kind == "lam":
        model = LatentActionModel(world.lam)
        return model, _video_loss(model, sprites, batch_size)
    d = world.dynamics
    model = DynamicsModel(d)
    frames = world.dynamics.max_frames
    if kind == "dynamics":
        gen = torch.Generator().manual_seed(0)
        shape = (batch_size, frames, d.tokens_per_frame)
        tokens = [torch.randint(0, d.num_tokens, shape, generator=gen) for _ in range(8)]
        actions = [torch.randint(0, d.num_actions, (batch_size, frames - 1), generator=gen) for _ in range(8)]
        return model, lambda i: model(tokens[i % 8], actions[i % 8]).loss
    # Untrained frozen models cost the same as trained ones.
    tokenizer = VideoTokenizer(world.tokenizer).eval().requires_grad_(False)
    lam = LatentActionModel(world.lam).eval().requires_grad_(False)
    videos = [sprites.batch(i, batch_size).frames for i in range(4)]

    def loss(i: int) -> Tensor:
        with torch.no_grad():
            tokens = tokenizer.encode(videos[i % 4])  # (B, T, N)
            actions = lam.infer_actions(videos[i % 4])  # (B, T-1)
        return model(tokens, actions).loss

    return model, loss


def _video_loss(model: nn.Module, sprites: MovingSprites, batch_size: int) -> Callable[[int], Tensor]:
    videos = [sprites.batch(i, batch_size).frames for i in range(4)]  # (B, T, H, W, 3) uint8
    return lambda i: model(videos[i % 4]).loss


def make_step(model: nn.Module, loss_fn: Callable[[int], Tensor], cfg: TrainConfig, bf16: bool) -> Callable[[], None]:
    """One optimiser step as genie.train.loop does it (without logging and checkpoints)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    model.train()
    counter = iter(range(1 << 30))

    def step() -> None:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            loss = loss_fn(next(counter))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        opt.step()

    return step


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch-size", type=int, default=0, help="0 = the preset's TrainConfig batch")
    parser.add_argument("--iters", type=int, default=0, help="timed steps; 0 = fit --budget-s, 2..10")
    parser.add_argument("--budget-s", type=float, default=60.0, help="timed seconds per model when --iters 0")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (TrainConfig.bf16)")
    parser.add_argument("--peak-gflops", type=float, default=0.0, help="skip measuring the matmul peak")
    args = parser.parse_args()
    machine = setup_run(args)
    world = get_preset(args.preset)
    peak = args.peak_gflops or matmul_peak()
    print(f"# fp32 matmul peak {peak:.1f} GFLOP/s", flush=True)

    for kind in args.models:
        cfg = world.train_config("dynamics" if kind == "dynamics_full" else kind)
        batch = args.batch_size or cfg.batch_size
        torch.manual_seed(0)
        model, loss_fn = build(kind, world, batch)
        step = make_step(model, loss_fn, cfg, args.bf16)
        t0 = time.perf_counter()
        flops, _ = count_flops(step)  # the warm-up step
        first_s = time.perf_counter() - t0
        iters = args.iters or max(2, min(10, int(args.budget_s / first_s)))
        timing = time_it(step, iters=iters, warmup=0)
        s = timing.median
        row = {
            "bench": "train",
            "preset": args.preset,
            "model": kind,
            "dtype": "bfloat16" if args.bf16 else "float32",
            "batch": batch,
            "frames": world.dynamics.max_frames,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            **timing.summary(),
            "s_per_step": s,
            "steps_per_s": 1 / s,
            "samples_per_s": batch / s,
            "gflop_per_step": flops / 1e9,
            "gflops": flops / s / 1e9,
            "peak_gflops": peak,
            "of_peak": flops / s / 1e9 / peak,
        }
        if args.preset == "peer-small":
            row["jasmine_s_per_step"] = JASMINE_S_PER_STEP[kind]
            row["speedup_vs_jasmine"] = JASMINE_S_PER_STEP[kind] / s
            row["target_3x_met"] = row["speedup_vs_jasmine"] >= SPEEDUP_TARGET
        emit(rounded(row), machine, args.out)


if __name__ == "__main__":
    main()
