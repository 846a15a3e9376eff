"""Pieces shared by the three models: frame geometry, patching, pixel scaling and position tables."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn


@dataclass(frozen=True)
class FrameSpec:
    height: int = 64
    width: int = 64
    channels: int = 3

    def __post_init__(self) -> None:
        if min(self.height, self.width, self.channels) < 1:
            raise ValueError(f"frame dims must be positive, got {self.height}x{self.width}x{self.channels}")

    def check_patch(self, patch: int, what: str) -> None:
        if patch < 1 or self.height % patch or self.width % patch:
            raise ValueError(f"{what} patch size {patch} does not divide the frame size {self.height}x{self.width}")

    def tokens_per_frame(self, patch: int) -> int:
        return (self.height // patch) * (self.width // patch)


def patchify(video: Tensor, patch: int) -> Tensor:
    """(B, T, H, W, C) -> (B, T, N, p*p*C)."""
    return rearrange(video, "b t (h p1) (w p2) c -> b t (h w) (p1 p2 c)", p1=patch, p2=patch)


def unpatchify(patches: Tensor, patch: int, spec: FrameSpec) -> Tensor:
    """(B, T, N, p*p*C) -> (B, T, H, W, C)."""
    return rearrange(
        patches, "b t (h w) (p1 p2 c) -> b t (h p1) (w p2) c", h=spec.height // patch, p1=patch, p2=patch, c=spec.channels
    )


def check_video(video: Tensor, spec: FrameSpec, max_frames: int, min_frames: int = 1) -> None:
    if video.ndim != 5 or tuple(video.shape[2:]) != (spec.height, spec.width, spec.channels):
        raise ValueError(
            f"expected video (B, T, {spec.height}, {spec.width}, {spec.channels}), got {tuple(video.shape)}"
        )
    if not min_frames <= video.shape[1] <= max_frames:
        raise ValueError(f"expected {min_frames}..{max_frames} frames, got {video.shape[1]}")


def to_model_range(video: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] pixels -> float [-1, 1]."""
    if video.dtype == torch.uint8:
        video = video.float() / 255.0
    return video.float() * 2.0 - 1.0


def to_uint8(video: Tensor) -> Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return ((video.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


class Positions(nn.Module):
    """Learned spatial (N, D) and temporal (T, D) position tables, added to (B, T, N, D) inputs."""

    def __init__(self, tokens: int, frames: int, dim: int) -> None:
        super().__init__()
        self.spatial = nn.Parameter(torch.randn(tokens, dim) * 0.02)
        self.temporal = nn.Parameter(torch.randn(frames, dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, N, D) -> same, positions from frame 0."""
        return x + self.spatial[None, None] + self.temporal[None, : x.shape[1], None]

    def frame(self, x: Tensor, index: Tensor) -> Tensor:
        """(B, N, D) at per-row frame index (B,) -> same."""
        return x + self.spatial[None] + self.temporal[index][:, None]
