"""Long-session drift: PSNR against ground truth per step when a session runs far past the window T.

Each held-out clip of steps+1 frames drives one session: the prompt is its first true frame and the actions
are the LAM's latent actions inferred from the true frames, so a perfect world would reproduce the clip.
The same sessions driven by random actions give the reference curve. Past step T the session slides its
window (`genie.sampling.slide`), so the curve shows what the sliding history costs.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from genie.data.shards import ShardedClips
from genie.data.source import VideoSource
from genie.data.synthetic import MovingSprites
from genie.eval.metrics import psnr
from genie.models.lam import LatentActionModel
from genie.sampling import World

log = logging.getLogger(__name__)


def long_clips(source: VideoSource, length: int, clips: int, seed: int = 0) -> Tensor:
    """`clips` held-out clips of `length` frames: (M, length, H, W, C) uint8, a pure function of the arguments.

    Shards: clips start at frame 0 of episodes with at least `length` frames, picked by a seeded permutation
    (fewer than `clips` when fewer episodes are long enough). Sprites: the source's own clips, regenerated with
    `length` frames. Any other source cannot give clips longer than its training clips: ValueError.
    """
    if isinstance(source, MovingSprites):
        sprites = MovingSprites(replace(source.cfg, frames=length))
        return torch.from_numpy(np.stack([sprites.clip(i)[0] for i in range(clips)]))
    if isinstance(source, ShardedClips):
        data = source.data
        long = [i for i, e in enumerate(data.episodes) if e.length >= length]
        if not long:
            raise ValueError(f"{data.root}: no episode has {length} frames; record longer ones (--max-frames)")
        picks = np.random.default_rng([seed, length]).permutation(long)[:clips]
        if len(picks) < clips:
            log.warning("only %d episodes of %s have %d frames; drift uses %d clips", len(long), data.root, length, len(picks))
        return torch.from_numpy(np.stack([data.clip(int(i), 0, length)[0] for i in picks]))
    raise ValueError(f"{type(source).__name__} cannot give clips of {length} frames; use shards or sprites")


def infer_long_actions(lam: LatentActionModel, frames: Tensor) -> Tensor:
    """Latent actions of videos longer than the LAM's window: (B, L, H, W, C) uint8 -> (B, L-1) int64.

    The LAM is causal in time and sees at most W = max_frames frames, so transition k -> k+1 is read from the
    window of frames ending at k+1 that holds as much past as fits: frames [max(0, k+2-W), k+2). The first
    window gives transitions 0..W-2 at once; each later transition costs one pass over its own window.
    """
    b, length = frames.shape[:2]
    w = lam.cfg.max_frames
    first = lam.infer_actions(frames[:, : min(w, length)])  # (B, min(W, L)-1)
    rest = [lam.infer_actions(frames[:, k + 2 - w : k + 2])[:, -1:] for k in range(w - 1, length - 1)]  # each (B, 1)
    actions = torch.cat([first, *rest], dim=1)  # (B, L-1)
    assert actions.shape == (b, length - 1), (actions.shape, b, length)
    return actions


def rollout(world: World, prompt: Tensor, actions: Tensor, seeds: list[int]) -> Tensor:
    """prompt (B, 1, H, W, C) uint8, actions (B, S) -> generated frames (B, S, H, W, C) uint8, sliding past T."""
    states, _ = world.reset(prompt, seeds)
    frames = []
    for s in range(actions.shape[1]):
        states, f = world.step(states, actions[:, s].tolist())
        frames.append(f)
    return torch.stack(frames, dim=1)


def _curve(p: Tensor) -> dict[str, list[float]]:
    """(M, S) PSNRs -> per-step mean and quartiles."""
    q = torch.quantile(p.double(), torch.tensor([0.25, 0.75], dtype=torch.float64), dim=0)  # (2, S)
    return {"mean": p.mean(0).tolist(), "p25": q[0].tolist(), "p75": q[1].tolist()}


@torch.no_grad()
def drift(
    world: World,
    lam: LatentActionModel,
    source: VideoSource,
    steps: int = 64,
    clips: int = 8,
    seed: int = 0,
    batch_size: int = 16,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """PSNR(generated_k, true_k) for k = 1..steps, inferred vs random actions; writes drift.png into `out_dir`.

    Returns {"steps", "clips", "window", "keep", "inferred": {mean, p25, p75}, "random": {...}, "plot"?},
    each curve a list of `steps` floats in dB (index 0 is step 1).
    """
    if steps < 1 or clips < 1 or batch_size < 1:
        raise ValueError(f"steps, clips and batch_size must be >= 1, got {steps}, {clips}, {batch_size}")
    frames = long_clips(source, steps + 1, clips, seed)  # (M, steps+1, H, W, C)
    rng = torch.Generator().manual_seed(seed)
    inf, rnd = [], []
    for lo in range(0, frames.shape[0], batch_size):
        batch = frames[lo : lo + batch_size]
        b = batch.shape[0]
        seeds = [seed * 100_003 + lo + i for i in range(b)]
        latent = infer_long_actions(lam, batch)  # (B, steps)
        random_actions = torch.randint(0, world.num_actions, (b, steps), generator=rng)
        truth = batch[:, 1:]
        inf.append(psnr(rollout(world, batch[:, :1], latent, seeds), truth))  # (B, steps)
        rnd.append(psnr(rollout(world, batch[:, :1], random_actions, seeds), truth))
    report: dict[str, Any] = {
        "steps": steps,
        "clips": int(frames.shape[0]),
        "window": world.window,
        "keep": world.keep,
        "inferred": _curve(torch.cat(inf)),
        "random": _curve(torch.cat(rnd)),
    }
    if out_dir is not None:
        report["plot"] = str(plot_drift(report, Path(out_dir) / "drift.png"))
    return report


def plot_drift(report: dict[str, Any], path: Path) -> Path:
    """PSNR vs step, inferred and random actions with their quartile bands, the window T marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(1, report["steps"] + 1)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, color in (("inferred", "tab:blue"), ("random", "tab:orange")):
        c = report[name]
        ax.plot(x, c["mean"], color=color, label=f"{name} actions (mean)")
        ax.fill_between(x, c["p25"], c["p75"], color=color, alpha=0.2, linewidth=0)
    t = report["window"]
    for k in range(t, report["steps"] + 1, max(1, t - report["keep"])):  # the first slide, then every T-keep steps
        ax.axvline(k, color="grey", linewidth=0.5, linestyle=":" if k > t else "--")
    ax.set_xlabel(f"step (window T = {t}; dotted: later slides)")
    ax.set_ylabel("PSNR vs ground truth (dB)")
    ax.set_title(f"Drift over {report['steps']} steps, {report['clips']} held-out clips (bands: 25-75%)")
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
