"""Batch generation through the ModelBackend interface: prompts x action sequences -> frames.

Used by `genie rollout` and the rollout jobs; with the Triton backend it shares the model services with the
gateway instead of loading its own copies. Callers run rollouts concurrently, so the backend batches across them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from genie.sampling import SamplingConfig, advance, new_state
from services.backends.backend import ModelBackend


@dataclass(frozen=True)
class Rollout:
    frames: np.ndarray  # (1 + L, H, W, C) uint8: the prompt's last frame as reconstructed, then one per action
    tokens: np.ndarray  # (1 + L, N) int32 in [0, K): the tokens of those frames


async def rollout_trace(backend: ModelBackend, prompt: np.ndarray, actions: Sequence[int], seed: int,
                        sampling: SamplingConfig | None = None) -> Rollout:
    """prompt: (t0, H, W, C) uint8 -> the frames and their tokens for one action sequence (L = len(actions))."""
    spec = backend.spec
    sampling = sampling or spec.sampling
    for a in actions:
        if not 0 <= int(a) < spec.num_actions:
            raise ValueError(f"action {a} is out of range [0, {spec.num_actions})")
    prompt_tokens = await backend.encode(prompt)  # (t0, N)
    state = new_state(uuid.uuid4().hex, torch.from_numpy(prompt_tokens), seed)
    frames, tokens = [await backend.decode_last(state)], [np.asarray(prompt_tokens[-1], dtype=np.int32)]
    for a in actions:
        step_tokens = await backend.next_tokens(state, int(a), sampling)
        state = advance(state, torch.from_numpy(step_tokens), int(a), spec.window, spec.keep)
        frames.append(await backend.decode_last(state))
        tokens.append(np.asarray(step_tokens, dtype=np.int32))
    return Rollout(np.stack(frames), np.stack(tokens))


async def rollout_one(backend: ModelBackend, prompt: np.ndarray, actions: Sequence[int], seed: int,
                      sampling: SamplingConfig | None = None) -> np.ndarray:
    """prompt: (t0, H, W, C) uint8 -> frames (1 + len(actions), H, W, C) uint8: the prompt's last frame as
    reconstructed, then one generated frame per action."""
    return (await rollout_trace(backend, prompt, actions, seed, sampling)).frames

