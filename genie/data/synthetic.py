"""Moving-sprites videos: a controllable sprite driven by random true actions among drifting distractors.

Every clip is a pure function of (seed, index), so a training run that resumes at step i sees exactly the
batches it would have seen without the interruption. True actions are recorded for evaluation only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from genie.data.source import VideoBatch

# True actions of the controlled sprite: (dy, dx) per frame, in pixels of a 64-pixel frame.
MOVES = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))
ACTION_NAMES = ("noop", "up", "down", "left", "right")


@dataclass(frozen=True)
class SpritesConfig:
    height: int = 64
    width: int = 64
    frames: int = 16
    distractors: int = 2
    sprite_size: int = 0  # 0 = height // 8
    speed: int = 0  # pixels per frame of the controlled sprite; 0 = height // 16
    action_repeat: int = 2  # a true action is held this many frames, like a player would
    seed: int = 0

    def __post_init__(self) -> None:
        if self.height < 8 or self.width < 8 or self.frames < 2:
            raise ValueError(f"sprites need frames >= 2 and size >= 8x8, got {self.frames}x{self.height}x{self.width}")
        if self.distractors < 0 or self.action_repeat < 1:
            raise ValueError(f"bad distractors={self.distractors} or action_repeat={self.action_repeat}")


class MovingSprites:
    """An endless, deterministic source of (B, T, H, W, 3) uint8 clips with true actions (B, T-1)."""

    num_true_actions = len(MOVES)

    @property
    def true_action_names(self) -> list[str]:
        """Names of the true actions, as datasets record theirs (ShardedClips.true_action_names)."""
        return list(ACTION_NAMES)

    def __init__(self, cfg: SpritesConfig) -> None:
        self.cfg = cfg
        self.size = cfg.sprite_size or max(2, cfg.height // 8)
        self.speed = cfg.speed or max(1, cfg.height // 16)

    def clip(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """One clip: frames (T, H, W, 3) uint8 and true actions (T-1,) int64."""
        c = self.cfg
        rng = np.random.default_rng([c.seed, index])
        bg = rng.integers(0, 90, size=3)
        colors = rng.integers(120, 256, size=(1 + c.distractors, 3))
        hi = np.array([c.height - self.size, c.width - self.size])
        pos = rng.integers(0, hi + 1, size=(1 + c.distractors, 2)).astype(np.int64)
        vel = rng.integers(-2, 3, size=(c.distractors, 2))
        held = rng.integers(0, len(MOVES), size=(c.frames + c.action_repeat) // c.action_repeat)
        actions = np.repeat(held, c.action_repeat)[: c.frames - 1]
        frames = np.empty((c.frames, c.height, c.width, 3), dtype=np.uint8)
        for t in range(c.frames):
            if t > 0:
                pos[0] = np.clip(pos[0] + self.speed * np.array(MOVES[actions[t - 1]]), 0, hi)
                pos[1:] += vel
                bounce = (pos[1:] < 0) | (pos[1:] > hi)
                vel[bounce] *= -1
                pos[1:] = np.clip(pos[1:], 0, hi)
            frame = np.broadcast_to(bg.astype(np.uint8), (c.height, c.width, 3)).copy()
            for k in range(c.distractors, -1, -1):  # controlled sprite drawn last, on top
                y, x = pos[k]
                frame[y : y + self.size, x : x + self.size] = colors[k]
            frames[t] = frame
        return frames, actions.astype(np.int64)

    def batch(self, step: int, batch_size: int) -> VideoBatch:
        """The training batch for `step`: clips step*B .. step*B + B - 1."""
        return self.batch_rows(step, batch_size, 0, batch_size)

    def batch_rows(self, step: int, batch_size: int, start: int, stop: int) -> VideoBatch:
        """Rows [start, stop) of batch(step, batch_size), built alone (one process's share of a global batch)."""
        clips = [self.clip(step * batch_size + i) for i in range(start, stop)]
        frames = torch.from_numpy(np.stack([f for f, _ in clips]))
        actions = torch.from_numpy(np.stack([a for _, a in clips]))
        return VideoBatch(frames=frames, actions=actions)
