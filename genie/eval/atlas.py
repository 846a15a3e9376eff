"""The action atlas: what each latent action does from several prompts, as a labelled grid (atlas.png, atlas.gif).

Every latent action a is held for `steps` steps from every prompt p; all A * P sessions run as one batch per step.
The sampling noise of a step depends only on (seed, step) (`genie.nn.maskgit.counter_uniform`), and every session
gets the same seed, so two actions from one prompt differ only by what the action does, and the atlas is
reproducible. The grid has a row of prompts on top and one row per action below it; the GIF animates the steps.

The numbers that tell actions apart (per action, final frame after `steps` steps, mean over prompts):
    change                  mean |pixel difference| (0-255) from the prompt: how much the action moves things
    psnr_vs_prompt          PSNR (dB) against the prompt
    psnr_vs_other_actions   mean PSNR against every other action's result from the same prompt: lower is more
                            distinct; PSNR_CAP (100 dB) means the frames are identical
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange, repeat
from torch import Tensor

from genie.eval.metrics import psnr
from genie.media import draw_text, save_png, text_width, write_gif
from genie.sampling import World
from genie.worlds import default_action_names

CELL_SCALE = 2  # frames are upscaled this much (nearest) in the grid
GAP = 2  # pixels between cells
TITLE = 16  # pixels of the title strip on top of the grid
LABEL_PAD = 8  # pixels around the row labels


@torch.no_grad()
def atlas_rollouts(world: World, prompts: Tensor, steps: int, seed: int = 0, batch_size: int = 64) -> Tensor:
    """Holds each latent action for `steps` steps from each prompt (P, H, W, C) uint8.

    Returns (A, P, steps + 1, H, W, C) uint8: frame 0 is the prompt as the tokenizer reconstructs it.
    Sessions are batched `batch_size` at a time (all A * P in one call by default); batching never changes frames.
    """
    if steps < 1 or prompts.ndim != 4 or prompts.shape[0] < 1:
        raise ValueError(f"need steps >= 1 and (P, H, W, C) prompts, got {steps} and {tuple(prompts.shape)}")
    num_actions, num_prompts = world.num_actions, prompts.shape[0]
    if not world.engine.caching:  # history caches make a step cost the same at any length; frames are identical
        world = World(world.tokenizer, world.dynamics, world.sampling, device=world.device)
    sessions = repeat(prompts, "p h w c -> (a p) 1 h w c", a=num_actions)  # (A*P, 1, H, W, C)
    actions = [a for a in range(num_actions) for _ in range(num_prompts)]  # the (a p) order of `sessions`
    chunks = []
    for lo in range(0, len(actions), batch_size):
        hi = min(lo + batch_size, len(actions))
        states, frame = world.reset(sessions[lo:hi], [seed] * (hi - lo))
        frames = [frame]  # each (b, H, W, C)
        for _ in range(steps):
            states, frame = world.step(states, actions[lo:hi])
            frames.append(frame)
        chunks.append(torch.stack(frames, dim=1))  # (b, steps + 1, H, W, C)
    return rearrange(torch.cat(chunks), "(a p) t h w c -> a p t h w c", a=num_actions)


def action_distinctness(rollouts: Tensor) -> dict[str, Any]:
    """Per-action numbers from (A, P, T, H, W, C) rollouts, comparing final frames (see the module docstring)."""
    start, final = rollouts[:, :, 0], rollouts[:, :, -1]  # (A, P, H, W, C)
    change = (final.float() - start.float()).abs().mean(dim=(-3, -2, -1))  # (A, P)
    vs_prompt = psnr(final, start)  # (A, P)
    num_actions = final.shape[0]
    pairwise = psnr(final[:, None].expand(-1, num_actions, -1, -1, -1, -1),
                    final[None].expand(num_actions, -1, -1, -1, -1, -1)).mean(-1)  # (A, A): mean over prompts
    others = ~torch.eye(num_actions, dtype=torch.bool)  # (A, A)
    per_action = []
    for a in range(num_actions):
        vs_other = float(pairwise[a][others[a]].mean()) if num_actions > 1 else float("nan")
        per_action.append({"action": a, "change": float(change[a].mean()), "psnr_vs_prompt": float(vs_prompt[a].mean()),
                           "psnr_vs_other_actions": vs_other})
    between = float(pairwise[others].mean()) if num_actions > 1 else float("nan")
    return {"actions": per_action, "mean_psnr_between_actions": between}


def grid_frames(rollouts: Tensor, labels: list[str], title: str, scale: int = CELL_SCALE) -> np.ndarray:
    """(A, P, T, H, W, C) rollouts -> (T, GH, GW, 3) uint8 grid frames: a prompt row, then one labelled row per action.

    GH = TITLE + GAP + (A + 1) * (H * scale + GAP); GW = label column + GAP + P * (W * scale + GAP).
    """
    num_actions, num_prompts, t, h, w, _ = rollouts.shape
    if len(labels) != num_actions + 1:
        raise ValueError(f"need {num_actions + 1} row labels (prompt row + actions), got {len(labels)}")
    prompt_row = repeat(rollouts[0, :, 0], "p h w c -> 1 p t h w c", t=t)  # the prompts, still over time
    rows = torch.cat([prompt_row, rollouts]).numpy()  # (A + 1, P, T, H, W, C)
    rows = rows.repeat(scale, axis=3).repeat(scale, axis=4)  # nearest upscale of every cell
    ch, cw = h * scale, w * scale
    label_w = max(text_width(label) for label in labels) + 2 * LABEL_PAD
    height = TITLE + GAP + (num_actions + 1) * (ch + GAP)
    width = label_w + GAP + num_prompts * (cw + GAP)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    canvas[:TITLE] = 0
    canvas[TITLE:, :label_w] = 0
    background = _labelled(canvas, labels, title, label_w, ch)
    grid = np.repeat(background[None], t, axis=0)  # (T, GH, GW, 3)
    for r in range(num_actions + 1):
        y = TITLE + GAP + r * (ch + GAP)
        for p in range(num_prompts):
            x = label_w + GAP + p * (cw + GAP)
            grid[:, y : y + ch, x : x + cw] = rows[r, p, ..., :3]
    return grid


def _labelled(canvas: np.ndarray, labels: list[str], title: str, label_w: int, cell_h: int) -> np.ndarray:
    """The canvas with the title and one label per row written in white on its black strips."""
    from PIL import Image

    image = Image.fromarray(canvas)
    draw_text(image, (LABEL_PAD, 2), title)
    for r, label in enumerate(labels):
        draw_text(image, (LABEL_PAD, TITLE + GAP + r * (cell_h + GAP) + cell_h // 2 - 6), label)
    return np.array(image)


def action_atlas(
    world: World,
    prompts: Tensor | np.ndarray,
    steps: int,
    names: list[str] | None,
    out_dir: Path,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Writes atlas.png (the frames after `steps` steps, cells upscaled CELL_SCALE times) and atlas.gif (every
    step, cells at frame size) into `out_dir`.

    prompts: (P, H, W, C) uint8 first frames; names: one per latent action (None: "action N").
    Returns the file paths, the settings and the per-action numbers of `action_distinctness`, names included.
    """
    prompts = torch.as_tensor(np.asarray(prompts))  # (P, H, W, C)
    num_actions = world.num_actions
    names = list(names) if names is not None else default_action_names(num_actions)
    if len(names) != num_actions:
        raise ValueError(f"{len(names)} action names for {num_actions} actions")
    rollouts = atlas_rollouts(world, prompts, steps, seed, batch_size)  # (A, P, steps + 1, H, W, C)
    numbers = action_distinctness(rollouts)
    for entry in numbers["actions"]:
        entry["name"] = names[entry["action"]]
    labels = ["prompt"] + [f"{a}: {name}" for a, name in enumerate(names)]
    title = f"each action held {steps} steps (seed {seed})"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The last step only: the first frame (the prompt row) and the last, not every step's upscaled grid.
    png = save_png(grid_frames(rollouts[:, :, [0, -1]], labels, title)[-1], out_dir / "atlas.png")
    captions = [f"step {t}/{steps}" for t in range(steps + 1)]
    grid = grid_frames(rollouts, labels, title, scale=1)  # (T, GH, GW, 3), unscaled to keep the GIF small
    gif = write_gif(grid, out_dir / "atlas.gif", fps=3, scale=1, captions=captions)
    return {"png": str(png), "gif": str(gif), "steps": steps, "prompts": int(prompts.shape[0]), "seed": seed, **numbers}
