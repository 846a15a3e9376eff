"""MaskGIT pieces: the mask schedule, train-time masking and the iterative parallel decoder.

The decoder is a pure function of a tokens -> logits callable, so it never imports a network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


_M32 = 0xFFFFFFFF
STREAM_TOKENS, STREAM_CHOICE = 0, 1  # independent noise streams of one iteration


def _fmix32(h: Tensor | int) -> Tensor | int:
    """murmur3's 32-bit finaliser on ints, or int64 tensors holding values in [0, 2^32): exact on every device."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32  # the product may wrap int64; its low 32 bits are still right
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def noise_key(seed: int, step: int) -> tuple[int, int]:
    """The 64-bit key of one (seed, step), as two 32-bit halves: every draw of that step derives from it."""
    x = _splitmix64(_splitmix64(seed & 0xFFFFFFFFFFFFFFFF) ^ (step & 0xFFFFFFFFFFFFFFFF))
    return x & _M32, x >> 32


def counter_uniform(keys: Tensor, iteration: int, stream: int, count: int) -> Tensor:
    """Counter-based U(0, 1) draws: a hash of (row key, iteration, stream, index), computed where `keys` live.

    keys: (B, 2) int64, each row's `noise_key`. Returns (B, count) float32 in (0, 1). A row's draws depend on
    its key only, never on the batch, the device or a generator's position, and the function reads nothing on the
    host, so it can run inside a captured CUDA graph.
    """
    salt = _fmix32((iteration * 0x27D4EB2F + stream * 0x165667B1 + 0x3C6EF372) & _M32)
    index = torch.arange(count, device=keys.device, dtype=torch.int64)  # (count,)
    h = _fmix32((index[None] * 0x9E3779B1 + salt) & _M32 ^ keys[:, :1])  # (B, count)
    h = _fmix32((h + keys[:, 1:]) & _M32)
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # 24 random bits: exactly representable, never 0 or 1


NoiseFn = Callable[[int, int, int], Tensor]  # (iteration, stream, count) -> (B, count) U(0, 1)


def decode_plan(unknown: int, steps: int, schedule: str) -> list[int]:
    """How many of `unknown` tokens stay masked after each iteration; ends at the first 0.

    The schedule's count, but at least one token is committed per iteration and all of them at the last. Known on
    the host before decoding starts, so the loop never reads the device to decide what to do next.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    plan, masked = [], unknown
    for s in range(steps):
        if masked == 0:
            break
        keep = 0 if s == steps - 1 else min(math.floor(unknown * mask_ratio((s + 1) / steps, schedule)), max(masked - 1, 0))
        plan.append(keep)
        masked = keep
    return plan


def sample_tokens(logits: Tensor, uniform: Tensor, temperature: float) -> Tensor:
    """One token per position: (B, N, K) float logits, (B, N) U(0, 1) -> (B, N) int64 from softmax(logits / T).

    Inverse-CDF sampling: one draw per position instead of K Gumbel draws; temperature 0 is the argmax.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    cdf = torch.softmax(logits / temperature, dim=-1).cumsum(dim=-1)  # (B, N, K)
    target = uniform[..., None] * cdf[..., -1:]  # scaled by the total so rounding never runs past the last code
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_max(logits.shape[-1] - 1)


@dataclass(frozen=True)
class DecodeState:
    """Loop state of one decode; fields are never mutated in place."""

    step: int
    tokens: Tensor  # (B, N) int64, mask_id where still unknown


def maskgit_decode(
    logits_fn: Callable[[Tensor], Tensor],
    tokens: Tensor,
    mask_id: int,
    noise: NoiseFn,
    steps: int,
    temperature: float = 1.0,
    schedule: str = "cosine",
    choice_temperature: float = 0.0,
    unknown: int | None = None,
) -> Tensor:
    """Iteratively fills the masked tokens of one frame per row.

    Args:
        logits_fn: (B, N) int64 tokens -> (B, N, K) float logits.
        tokens: (B, N) int64, `mask_id` at the positions to generate (as many in every row). Not modified.
        noise: (iteration, stream, count) -> (B, count) U(0, 1) draws, each row's its own (e.g. `counter_uniform`).
        steps: S >= 1 decoding iterations.
        temperature: softmax temperature for sampling tokens (0 means greedy argmax).
        choice_temperature: scale of Gumbel noise added to confidences, annealed to 0 over the steps.
        unknown: the masked positions per row, when the caller knows it (saves reading the device).
    Returns:
        (B, N) int64 with every position filled.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    b, n = tokens.shape
    if unknown is None:
        counts = set((tokens == mask_id).sum(dim=1).tolist())
        if len(counts) > 1:
            raise ValueError(f"every row must have as many masked tokens, got {sorted(counts)}")
        unknown = counts.pop() if counts else 0
    state = DecodeState(step=0, tokens=tokens)
    for s, keep in enumerate(decode_plan(unknown, steps, schedule)):
        masked = state.tokens == mask_id  # (B, N)
        logits = logits_fn(state.tokens).float()  # (B, N, K)
        sampled = sample_tokens(logits, noise(s, STREAM_TOKENS, n), temperature)  # (B, N)
        confidence = torch.log_softmax(logits, dim=-1).gather(-1, sampled[..., None]).squeeze(-1)  # (B, N)
        if choice_temperature > 0:
            confidence = confidence + choice_temperature * (1 - (s + 1) / steps) * _gumbel(noise(s, STREAM_CHOICE, n))
        candidate = torch.where(masked, sampled, state.tokens)
        if keep:
            # Re-mask the `keep` least confident new tokens; known ones (+inf) never. Stable: ties break by position.
            confidence = confidence.masked_fill(~masked, math.inf)
            order = torch.sort(confidence, dim=1, stable=True).indices[:, :keep]  # (B, keep)
            candidate = candidate.scatter(1, order, mask_id)
        state = DecodeState(step=s + 1, tokens=candidate)
    return state.tokens
