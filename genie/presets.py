"""Named world configs. Each is a function so the composition reads top to bottom."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from genie.config import DataConfig, TrainConfig, WorldConfig
from genie.models.common import FrameSpec
from genie.models.dynamics import DynamicsModelConfig
from genie.models.lam import LatentActionModelConfig
from genie.models.tokenizer import VideoTokenizerConfig
from genie.nn.st_transformer import STTransformerConfig
from genie.nn.vq import VectorQuantizerConfig
from genie.sampling import SamplingConfig


def _world(
    name: str,
    size: int,
    frames: int,
    tok_patch: int,
    tok_codes: int,
    tok_st: STTransformerConfig,
    lam_patch: int,
    lam_st: STTransformerConfig,
    dyn_st: STTransformerConfig,
    actions: int,
    sampling: SamplingConfig,
    train: dict[str, TrainConfig],
    code_dim: int = 32,
) -> WorldConfig:
    frame = FrameSpec(size, size, 3)
    tokenizer = VideoTokenizerConfig(frame, tok_patch, tok_st, tok_st, VectorQuantizerConfig(tok_codes, code_dim))
    lam = LatentActionModelConfig(frame, lam_patch, lam_st, lam_st, VectorQuantizerConfig(actions, code_dim))
    dynamics = DynamicsModelConfig(tok_codes, tokenizer.tokens_per_frame, actions, dyn_st)
    return WorldConfig(
        name=name,
        data=DataConfig(height=size, width=size, frames=frames),
        tokenizer=tokenizer,
        lam=lam,
        dynamics=dynamics,
        sampling=sampling,
        train_tokenizer=train["tokenizer"],
        train_lam=train["lam"],
        train_dynamics=train["dynamics"],
    )


def _cpu_schedule(tokenizer: int, lam: int, dynamics: int, ckpt_every: int) -> dict[str, TrainConfig]:
    """Batch 8, lr 1e-3 with 100 warmup steps: what the small CPU worlds train with; steps per model."""
    steps = {"tokenizer": tokenizer, "lam": lam, "dynamics": dynamics}
    return {k: TrainConfig(steps=n, batch_size=8, lr=1e-3, warmup_steps=100, ckpt_every=ckpt_every) for k, n in steps.items()}


def tiny() -> WorldConfig:
    """Seconds-fast config for tests: 16x16 frames, 4 tokens a side, 2-layer d=32 transformers."""
    st = STTransformerConfig(dim=32, depth=2, heads=4, ffn_mult=2, max_frames=6)
    train = TrainConfig(steps=200, batch_size=8, lr=2e-3, warmup_steps=10, log_every=20, ckpt_every=50)
    return _world(
        "tiny", 16, 6, 4, 64, st, 8, st, st, 4, SamplingConfig(steps=4, temperature=1.0),
        {"tokenizer": train, "lam": train, "dynamics": train}, code_dim=16,
    )


def sprites() -> WorldConfig:
    """A small synthetic world: 32x32 moving sprites as 8x8 tokens, sized for CPU training (no data to generate)."""
    st = STTransformerConfig(dim=96, depth=3, heads=4, max_frames=8)
    dyn = STTransformerConfig(dim=128, depth=4, heads=4, max_frames=8)
    train = _cpu_schedule(tokenizer=1500, lam=1000, dynamics=2000, ckpt_every=250)
    return _world("sprites", 32, 8, 4, 512, st, 8, st, dyn, 8, SamplingConfig(steps=8, temperature=1.0), train)


def demo() -> WorldConfig:
    """The shipped demo world: Procgen CoinRun at 64x64 as 8x8 tokens (patch 8), sized to train on a 2-core CPU
    in about an hour and to step at >= 10 frames/s there. Data: `genie data generate` into data/coinrun/."""
    st = STTransformerConfig(dim=128, depth=3, heads=4, max_frames=8)
    dyn = STTransformerConfig(dim=192, depth=4, heads=6, max_frames=8)
    train = _cpu_schedule(tokenizer=2000, lam=1000, dynamics=2000, ckpt_every=100)
    world = _world("demo", 64, 8, 8, 512, st, 16, st, dyn, 8, SamplingConfig(steps=8, temperature=1.0), train)
    data = replace(world.data, source="shards", path="data/coinrun/train", eval_path="data/coinrun/val")
    return replace(world, data=data)


def demo_walk() -> WorldConfig:
    """The walking CoinRun world, trained on a 2-core CPU in <= 2.5 hours (`scripts/build_walking_world.sh`): data from
    the arrow-key "walk" policy; a larger tokenizer (d=192, codebook 1024) whose decoder is a small part of a step; a
    LAM that sees one past frame (context=1) so each latent must name the motion of its own step; the demo
    world's dynamics size (d=192 x 4) so a step costs about what the demo's does. bf16 where the CPU has it. Six MaskGIT
    steps per frame: 1.27x the frames/s of eight within issue 24's quality gate (benchmarks/README.md).
    The shipped world's LAM goes on from this preset's for a second phase (`lam.change_focus=1`, 3,000 steps at lr
    3e-4, warm-started): scripts/build_walking_world.sh runs both phases and passes phase 2's settings to the build.
    The dynamics trains on tokens and latent actions encoded once for the dataset (`encode_once`): its step is 20-30%
    cheaper than encoding every step's clips, for the price of one pass over the data (benchmarks/README.md)."""
    frame = FrameSpec(64, 64, 3)
    tok_st = STTransformerConfig(dim=192, depth=3, heads=6, max_frames=8)
    lam_st = STTransformerConfig(dim=128, depth=3, heads=4, max_frames=8)
    dyn_st = STTransformerConfig(dim=192, depth=4, heads=6, max_frames=8)
    tokenizer = VideoTokenizerConfig(frame, 8, tok_st, tok_st, VectorQuantizerConfig(1024, 32))
    lam = LatentActionModelConfig(frame, 16, lam_st, lam_st, VectorQuantizerConfig(8, 32), context=1,
                                  time_reversal=0.5, balance=0.1)
    dynamics = DynamicsModelConfig(1024, tokenizer.tokens_per_frame, 8, dyn_st)

    def run(steps: int) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=200, bf16=True, ckpt_every=250)

    data = DataConfig(source="shards", path="data/coinrun-walk/train", eval_path="data/coinrun-walk/val",
                      height=64, width=64, frames=8)
    return WorldConfig(name="demo-walk", data=data, tokenizer=tokenizer, lam=lam, dynamics=dynamics,
                       sampling=SamplingConfig(steps=6, temperature=1.0), train_tokenizer=run(4000),
                       train_lam=run(4000), train_dynamics=replace(run(6000), encode_once=True))


def peer_small() -> WorldConfig:
    """Matches jasmine's "peer-small" (../shared/DESIGN.md) so training/sampling speeds compare on equal work:
    64x64x3, T=16, batch 8, d=256, ffn 1024, 4 blocks, 8 heads; tokenizer patch 4, codebook 1024x32;
    LAM patch 16, 6 codes; dynamics 4 blocks."""
    st = STTransformerConfig(dim=256, depth=4, heads=8, ffn_mult=4, max_frames=16)
    train = TrainConfig(steps=1000, batch_size=8)
    return _world(
        "peer-small", 64, 16, 4, 1024, st, 16, st, st, 6, SamplingConfig(steps=25, temperature=2.0),
        {"tokenizer": train, "lam": train, "dynamics": train},
    )


PRESETS: dict[str, Callable[[], WorldConfig]] = {"tiny": tiny, "sprites": sprites, "demo": demo, "demo-walk": demo_walk,
                                                 "peer-small": peer_small}


def get_preset(name: str) -> WorldConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()
