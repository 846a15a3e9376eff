"""MaskGIT pieces: the mask schedule, train-time masking and the iterative parallel decoder.

The decoder is a pure function of a tokens -> logits callable, so it never imports a network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SCHEDULES = ("cosine", "linear", "square")


def mask_ratio(progress: float, schedule: str = "cosine") -> float:
    """Fraction of unknown tokens still masked after decoding `progress` in (0, 1] of the steps."""
    if schedule == "cosine":
        return math.cos(math.pi / 2 * progress)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "square":
        return 1.0 - progress**2
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def random_frame_mask(
    shape: tuple[int, int, int], min_rate: float, max_rate: float, generator: torch.Generator | None = None
) -> Tensor:
    """Train-time mask for (B, T, N) tokens: each frame gets a rate ~ U[min_rate, max_rate], then Bernoulli.

    Frame 0 is never masked (it is always given as context). Returns (B, T, N) bool, True = masked.
    """
    b, t, n = shape
    rates = min_rate + (max_rate - min_rate) * torch.rand(b, t, 1, generator=generator)  # (B, T, 1)
    mask = torch.rand(b, t, n, generator=generator) < rates
    mask[:, 0] = False
    return mask


def _gumbel(uniform: Tensor) -> Tensor:
    """Standard Gumbel noise from U(0, 1) samples (clamped away from 0 and 1)."""
    return -torch.log((-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7))).clamp_min(1e-20))


@dataclass(frozen=True)
class DecodeState:
    """Loop state of one decode; fields are never mutated in place."""

    step: int
    tokens: Tensor  # (B, N) int64, mask_id where still unknown


def maskgit_decode(
    logits_fn: Callable[[Tensor], Tensor],
    tokens: Tensor,
    mask_id: int,
    generators: Sequence[torch.Generator],
    steps: int,
    temperature: float = 1.0,
    schedule: str = "cosine",
    choice_temperature: float = 0.0,
) -> Tensor:
    """Iteratively fills the masked tokens of one frame per row.

    Args:
        logits_fn: (B, N) int64 tokens -> (B, N, K) float logits.
        tokens: (B, N) int64, `mask_id` at the positions to generate. Not modified.
        generators: one torch.Generator per row, so each row's samples do not depend on the batch.
        steps: S >= 1 decoding iterations.
        temperature: softmax temperature for sampling tokens (0 means greedy argmax).
        choice_temperature: scale of Gumbel noise added to confidences, annealed to 0 over the steps.
    Returns:
        (B, N) int64 with every position filled.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if len(generators) != tokens.shape[0]:
        raise ValueError(f"need one generator per row: {len(generators)} for batch {tokens.shape[0]}")
    state = DecodeState(step=0, tokens=tokens.clone())
    unknown0 = (tokens == mask_id).sum(dim=1)  # (B,)
    for s in range(steps):
        masked = state.tokens == mask_id  # (B, N)
        if not masked.any():
            break
        logits = logits_fn(state.tokens).float()  # (B, N, K)
        uniform = torch.stack([torch.rand(logits.shape[1:], generator=g) for g in generators])  # (B, N, K)
        if temperature > 0:
            sampled = (logits / temperature + _gumbel(uniform)).argmax(dim=-1)  # (B, N)
        else:
            sampled = logits.argmax(dim=-1)
        probs = torch.softmax(logits, dim=-1).gather(-1, sampled[..., None]).squeeze(-1)  # (B, N)
        confidence = torch.log(probs.clamp_min(1e-20))
        if choice_temperature > 0:
            noise = torch.stack([torch.rand(logits.shape[1], generator=g) for g in generators])  # (B, N)
            confidence = confidence + choice_temperature * (1 - (s + 1) / steps) * _gumbel(noise)
        confidence = torch.where(masked, confidence, torch.full_like(confidence, math.inf))  # known: keep
        candidate = torch.where(masked, sampled, state.tokens)
        n_masked = masked.sum(dim=1)  # (B,)
        # Re-mask the least confident; always commit at least one token per step and all on the last.
        keep_masked = torch.floor(unknown0.float() * mask_ratio((s + 1) / steps, schedule)).long()
        keep_masked = torch.minimum(keep_masked, (n_masked - 1).clamp_min(0))
        if s == steps - 1:
            keep_masked = torch.zeros_like(keep_masked)
        order = confidence.argsort(dim=1)  # (B, N) ascending
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
        remask = rank < keep_masked[:, None]  # (B, N)
        state = DecodeState(step=s + 1, tokens=torch.where(remask, torch.full_like(candidate, mask_id), candidate))
    return state.tokens
