"""The behavioural-cloning policy (a small CNN: the last few frames -> action logits), the latent -> real action
mapping fitted from a few labelled transitions, and the LAM labelling of unlabelled frames."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class PolicyConfig:
    num_actions: int = 8  # |A| latent actions (LAM-BC) or the game's 15 (the oracle)
    context: int = 2  # frames the policy sees: the current one and context-1 before it (velocity needs 2)
    height: int = 64
    width: int = 64
    channels: int = 3
    width_mult: int = 32  # channels of the conv trunk
    hidden: int = 256
    # "nature": the Nature-DQN trunk, halved (an 8x8 stride-4 first layer: cheap, coarse); "impala": the IMPALA
    # ResNet trunk (Espeholt et al., 2018: three stages of conv, max-pool and two residual blocks, channels
    # width_mult/2, width_mult, width_mult), the one that generalises across Procgen levels (Cobbe et al., 2020).
    arch: str = "nature"

    def __post_init__(self) -> None:
        if self.num_actions < 2 or self.context < 1 or self.width_mult < 2 or self.hidden < 1:
            raise ValueError(f"need num_actions >= 2, context >= 1, width_mult >= 2, hidden >= 1; got {self}")
        if self.arch not in ("nature", "impala"):
            raise ValueError(f"arch must be 'nature' or 'impala', got {self.arch!r}")
        if self.height < 32 or self.width < 32:
            raise ValueError(f"frames must be at least 32x32, got {self.height}x{self.width}")


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


def _impala_stage(c_in: int, c_out: int) -> nn.Sequential:
    """conv 3x3 -> max-pool 3x3 stride 2 (halves H and W) -> two residual blocks."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.MaxPool2d(3, stride=2, padding=1),
                         _Residual(c_out), _Residual(c_out))


class Policy(nn.Module):
    """frames (B, context, H, W, C) uint8 -> logits (B, A). A Nature-DQN-style trunk, halved, or the IMPALA one."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, k = cfg.width_mult, cfg.context * cfg.channels
        if cfg.arch == "impala":
            self.trunk = nn.Sequential(
                _impala_stage(k, c // 2), _impala_stage(c // 2, c), _impala_stage(c, c),  # (B, c, H/8, W/8)
                nn.ReLU(), nn.Flatten(),
            )
        else:
            self.trunk = nn.Sequential(
                nn.Conv2d(k, c // 2, 8, stride=4), nn.ReLU(),
                nn.Conv2d(c // 2, c, 4, stride=2), nn.ReLU(),
                nn.Conv2d(c, c, 3, stride=1), nn.ReLU(),
                nn.Flatten(),
            )
        with torch.no_grad():
            flat = self.trunk(torch.zeros(1, k, cfg.height, cfg.width)).shape[1]
        self.head = nn.Sequential(nn.Linear(flat, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.num_actions))

    def features(self, frames: Tensor) -> Tensor:
        """The hidden layer the action logits are read from: (B, context, H, W, C) uint8 -> (B, hidden); an RL value
        head reads the same features (genie.agent.finetune)."""
        cfg = self.cfg
        expected = (cfg.context, cfg.height, cfg.width, cfg.channels)
        if frames.ndim != 5 or tuple(frames.shape[1:]) != expected:
            raise ValueError(f"expected frames (B, {', '.join(map(str, expected))}), got {tuple(frames.shape)}")
        b = frames.shape[0]
        x = frames.float().div(255.0).permute(0, 1, 4, 2, 3).reshape(b, -1, cfg.height, cfg.width)  # (B, K*C, H, W)
        return self.head[1](self.head[0](self.trunk(x)))  # (B, hidden)

    def forward(self, frames: Tensor) -> Tensor:
        return self.head[2](self.features(frames))  # (B, A)

    @torch.no_grad()
    def act(self, frames: Tensor, generator: torch.Generator | None = None, greedy: bool = False) -> Tensor:
        """Samples (or takes the argmax of) the policy's action: (B, context, H, W, C) uint8 -> (B,) int64."""
        logits = self(frames)
        if greedy:
            return logits.argmax(-1)
        return torch.multinomial(F.softmax(logits, -1), 1, generator=generator)[:, 0]


def context_frames(frames: np.ndarray, t: np.ndarray, context: int) -> np.ndarray:
    """The policy's input at steps t of one episode: (F, H, W, C) frames, (B,) steps -> (B, context, H, W, C); steps
    before the first frame repeat it, as at the start of an episode in the game."""
    idx = np.clip(t[:, None] + np.arange(1 - context, 1)[None, :], 0, None)  # (B, context)
    return frames[idx]


def random_shift(frames: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Data augmentation: each example's frames (B, K, H, W, C) moved by one random (dy, dx) in [-pad, pad], the
    border repeating its edge pixels (as DrQ / RAD do), the same shift for all K frames of an example so the motion
    between them is kept. pad=0 returns the frames unchanged."""
    if pad <= 0:
        return frames
    b, _, h, w, _ = frames.shape
    padded = np.pad(frames, ((0, 0), (0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    offsets = rng.integers(0, 2 * pad + 1, size=(b, 2))
    return np.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets)])


@dataclass(frozen=True)
class ActionMapping:
    """latent action -> real action, fitted from labelled transitions (each latent's most frequent real action;
    latents never seen in the labelled set get the most frequent real action overall)."""

    table: tuple[int, ...]  # (A,) real action of each latent
    counts: tuple[tuple[int, ...], ...]  # (A, R) labelled transitions per (latent, real)
    labelled: int  # k: transitions it was fitted from

    @classmethod
    def fit(cls, latent: np.ndarray, real: np.ndarray, num_latent: int, num_real: int) -> ActionMapping:
        latent, real = np.asarray(latent, dtype=np.int64), np.asarray(real, dtype=np.int64)
        if latent.shape != real.shape or latent.ndim != 1 or len(latent) == 0:
            raise ValueError(f"need equal-length 1-d latent and real actions, got {latent.shape} and {real.shape}")
        if latent.min() < 0 or latent.max() >= num_latent or real.min() < 0 or real.max() >= num_real:
            raise ValueError(f"actions out of range: latent in [0, {num_latent}), real in [0, {num_real})")
        counts = np.zeros((num_latent, num_real), dtype=np.int64)
        np.add.at(counts, (latent, real), 1)
        overall = int(counts.sum(0).argmax())
        table = tuple(int(row.argmax()) if row.sum() else overall for row in counts)
        return cls(table, tuple(tuple(int(c) for c in row) for row in counts), len(latent))

    def __call__(self, latent: Tensor | np.ndarray) -> np.ndarray:
        return np.asarray(self.table, dtype=np.int64)[np.asarray(latent, dtype=np.int64)]


@torch.no_grad()
def label_latent_actions(lam: nn.Module, frames: np.ndarray | Tensor, batch: int = 64) -> np.ndarray:
    """The frozen LAM's latent action of every transition of one episode: (F, H, W, C) uint8 -> (F-1,) int64.

    A pure function of the frames: the episode is cut into windows of W = lam.cfg.max_frames frames that overlap by
    one (transitions [0, W-1), [W-1, 2W-2), ...), and every transition is read from its window (causal in time, so
    transition t sees the frames of its window up to t+1).
    """
    # A read-only array (a memory-mapped shard) is copied: torch warns on, and must not write through, such a view.
    if isinstance(frames, Tensor):
        video = frames
    else:
        array = np.asarray(frames)
        video = torch.from_numpy(array if array.flags.writeable else array.copy())
    if video.ndim != 4 or video.dtype != torch.uint8:
        raise ValueError(f"expected (F, H, W, C) uint8 frames, got {tuple(video.shape)} {video.dtype}")
    n, w = video.shape[0], lam.cfg.max_frames
    if n < 2:
        return np.zeros(0, dtype=np.int64)
    starts = list(range(0, n - 1, w - 1))
    full = [s for s in starts if s + w <= n]
    out = np.zeros(n - 1, dtype=np.int64)
    for i in range(0, len(full), batch):
        chunk = full[i : i + batch]
        acts = lam.infer_actions(torch.stack([video[s : s + w] for s in chunk]))  # (b, W-1)
        for s, a in zip(chunk, acts.numpy(), strict=True):
            out[s : s + w - 1] = a
    if len(full) < len(starts):  # the last, shorter window
        s = starts[len(full)]
        out[s:] = lam.infer_actions(video[None, s:])[0].numpy()
    return out
