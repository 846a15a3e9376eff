"""One LAM-BC policy played twice from the same held-out level: in the real Procgen game (latent actions mapped to
real ones) and inside a world (latent actions directly, prompted with the level's first frame), side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from genie.agent.eval import AgentEvalConfig
from genie.agent.expert import make_env
from genie.agent.policy import ActionMapping, Policy, context_frames
from genie.envs.world_env import WorldEngine, WorldEnv

GAP = 4  # pixels between the two panels


def _ctx(history: list[np.ndarray], context: int) -> torch.Tensor:
    window = np.stack(history[-context:])
    return torch.from_numpy(context_frames(window, np.array([len(window) - 1]), context))  # (1, K, H, W, C)


def side_by_side(policy: Policy, mapping: ActionMapping, engine: WorldEngine, level_index: int = 0, steps: int = 64,
                 seed: int = 0, cfg: AgentEvalConfig | None = None) -> tuple[np.ndarray, list[str]]:
    """Frames (steps+1, H, 2W+GAP, 3) uint8 (game | world) and one caption per frame."""
    cfg = cfg or AgentEvalConfig(levels=level_index + 1, seed=seed)
    level = cfg.level_seeds()[level_index]
    game = make_env(cfg.env, level, cfg.distribution_mode)
    first = game.observe()[1]["rgb"][0].copy()
    env = WorldEnv(engine=engine, prompts=first[None], max_steps=steps)
    world_frame, _ = env.reset(seed=seed, options={"prompt": 0})
    gen_game, gen_world = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    game_hist, world_hist = [first], [world_frame]
    panels, captions, outcome = [(first, world_frame)], [f"level {level}: game | world"], ""
    for t in range(steps):
        if not outcome:
            real = int(mapping(policy.act(_ctx(game_hist, policy.cfg.context), generator=gen_game).numpy())[0])
            game.act(np.array([real]))
            rew, obs, done = game.observe()
            if done[0]:
                outcome = "coin!" if rew[0] > 0 else "died"
            else:
                game_hist.append(obs["rgb"][0].copy())
        latent = int(policy.act(_ctx(world_hist, policy.cfg.context), generator=gen_world)[0])
        world_frame, *_ = env.step(latent)
        world_hist.append(world_frame)
        panels.append((game_hist[-1], world_frame))
        captions.append(f"t={t + 1} {outcome or 'playing'} | latent {latent}")
    h, w, c = first.shape
    out = np.zeros((len(panels), h, 2 * w + GAP, c), dtype=np.uint8)
    for i, (g, wf) in enumerate(panels):
        out[i, :, :w], out[i, :, w + GAP :] = g, wf
    return out, captions


def write_showcase(policy: Policy, mapping: ActionMapping, engine: WorldEngine, out: Path, **kw) -> Path:
    from genie.media import write_gif

    frames, captions = side_by_side(policy, mapping, engine, **kw)
    return write_gif(frames, out, fps=10, scale=2, captions=captions)
