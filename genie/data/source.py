"""The interface every video source implements for training and evaluation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass
class VideoBatch:
    frames: Tensor  # (B, T, H, W, C) uint8
    actions: Tensor | None  # (B, T-1) int64 true actions (evaluation only), None when unknown

    def apply(self, fn: Callable[[Tensor], Tensor]) -> VideoBatch:
        """The batch with `fn` applied to each of its tensors (rows, a device, pinned memory)."""
        return VideoBatch(fn(self.frames), None if self.actions is None else fn(self.actions))


class VideoSource(Protocol):
    def batch(self, step: int, batch_size: int) -> VideoBatch:
        """A deterministic batch for a training step, so resumed runs see the same data."""
        ...
