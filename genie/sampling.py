"""The world step: prompt -> tokens, then step(action) -> next frame, batched over sessions, with K/V caches.

Two engines do the work, so that a server can run them as separate services (Triton's `dynamics` and
`tokenizer` models) and still share one definition of a step:

    DynamicsEngine.next_tokens(states, actions)   -> the next frame's tokens   (MaskGIT over the dynamics model)
    FrameDecoder.decode_last(states)              -> the last frame's pixels   (tokenizer decoder)

`advance` is the pure state transition between them; `World` composes all three in process.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from genie.models.common import check_video, to_uint8
from genie.models.dynamics import DynamicsModel
from genie.models.tokenizer import VideoTokenizer
from genie.nn.maskgit import SCHEDULES, maskgit_decode
from genie.nn.st_transformer import KVCache
from genie.state import KVCacheStore, WorldState, digest


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 25  # S MaskGIT iterations per frame (Genie paper: 25)
    temperature: float = 2.0  # Genie paper: 2, random sampling
    schedule: str = "cosine"
    choice_temperature: float = 0.0  # Gumbel noise on confidences, annealed (MaskGIT); 0 = off
    keep_frames: int = 0  # frames kept when the window is full and slides; 0 = half the window

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.temperature < 0 or self.choice_temperature < 0:
            raise ValueError(f"temperatures must be >= 0, got {self.temperature}, {self.choice_temperature}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if self.keep_frames < 0:
            raise ValueError(f"keep_frames must be >= 0, got {self.keep_frames}")

    def keep(self, window: int) -> int:
        """Frames kept when a window of `window` frames slides."""
        keep = self.keep_frames or max(1, window // 2)
        if keep >= window:
            raise ValueError(f"keep_frames {keep} must be < window {window}")
        return keep


def step_generator(seed: int, step: int) -> torch.Generator:
    """The sampling noise of one step depends only on (seed, step): not on batch mates or replicas."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 29
    return torch.Generator().manual_seed(x & 0x7FFFFFFFFFFFFFFF)


def slide(state: WorldState, window: int, keep: int) -> WorldState:
    """Drops the oldest frames when the window has no room for one more; positions restart at 0 as in training."""
    if state.tokens.shape[0] < window:
        return state
    actions = state.actions[-keep:].clone()
    actions[0] = -1  # what led into the new first frame is outside the context, as in training
    return replace(state, tokens=state.tokens[-keep:].clone(), actions=actions)


def advance(state: WorldState, tokens: Tensor, action: int, window: int, keep: int) -> WorldState:
    """The state after one step: slide if full, append the new frame's tokens (N,) and its action."""
    s = slide(state, window, keep)
    return replace(
        s,
        tokens=torch.cat([s.tokens, tokens.reshape(1, -1).to(torch.int32)]),
        actions=torch.cat([s.actions, torch.tensor([int(action)], dtype=torch.int32)]),
        version=state.version + 1,
        step=state.step + 1,
    )


def _dyn_key(session_id: str, tokens: Tensor, actions: Tensor) -> tuple[str, str, str]:
    # Keyed by content, not by version: two replicas racing on one version can never swap caches.
    return (session_id, "dynamics", digest(tokens, actions))


def _dec_key(session_id: str, tokens: Tensor) -> tuple[str, str, str]:
    return (session_id, "decoder", digest(tokens))


class DynamicsEngine:
    """MaskGIT next-frame tokens for a batch of sessions, with a soft K/V cache of each session's history."""

    def __init__(self, dynamics: DynamicsModel, keep_frames: int = 0, cache: KVCacheStore | None = None) -> None:
        self.dynamics = dynamics.eval()
        self.cache = cache
        self.window = dynamics.cfg.max_frames
        self.keep = SamplingConfig(keep_frames=keep_frames).keep(self.window)

    @property
    def num_actions(self) -> int:
        return self.dynamics.cfg.num_actions

    def check_actions(self, actions: Sequence[int]) -> None:
        for a in actions:
            if not 0 <= int(a) < self.num_actions:
                raise ValueError(f"action {a} is out of range [0, {self.num_actions})")

    @torch.no_grad()
    def next_tokens(self, states: Sequence[WorldState], actions: Sequence[int], sampling: SamplingConfig) -> Tensor:
        """The next frame's tokens for each session: (B, N) int32. Deterministic in (state, action, sampling)."""
        if len(states) != len(actions) or not states:
            raise ValueError(f"need one action per state, got {len(actions)} for {len(states)}")
        self.check_actions(actions)
        slid = [slide(s, self.window, self.keep) for s in states]
        dyn = KVCache.stack([self._cache_for(s) for s in slid])
        action_in = torch.tensor([int(a) for a in actions], dtype=torch.long)  # (B,)
        generators = [step_generator(s.seed, s.step) for s in slid]
        n, mask_id = self.dynamics.cfg.tokens_per_frame, self.dynamics.cfg.mask_id
        tokens = maskgit_decode(
            lambda x: self.dynamics.frame_logits(x, action_in, dyn),
            torch.full((len(states), n), mask_id, dtype=torch.long),
            mask_id,
            generators,
            steps=sampling.steps,
            temperature=sampling.temperature,
            schedule=sampling.schedule,
            choice_temperature=sampling.choice_temperature,
        )  # (B, N)
        self.dynamics.frame_logits(tokens, action_in, dyn, commit=True)
        if self.cache is not None:
            for s, row, a, c in zip(slid, tokens, action_in, dyn.unstack(), strict=True):
                new = advance(s, row, int(a), self.window, self.keep)
                self.cache.put(_dyn_key(s.session_id, new.tokens, new.actions), c)
        return tokens.to(torch.int32)

    @torch.no_grad()
    def prime(self, states: Sequence[WorldState]) -> None:
        """Builds and stores the history caches of new sessions, so that their first step is a cache hit."""
        if self.cache is not None:
            for s in states:
                self.cache.put(_dyn_key(s.session_id, s.tokens, s.actions), self._cache_for(s))

    def _cache_for(self, state: WorldState) -> KVCache:
        if self.cache is not None:
            hit = self.cache.take(_dyn_key(state.session_id, state.tokens, state.actions))
            if hit is not None:
                return hit
        if state.tokens.shape[0] >= self.window:
            raise ValueError(f"state holds {state.tokens.shape[0]} frames, more than the window {self.window} allows")
        cache = self.dynamics.new_cache(1)
        null = self.dynamics.cfg.null_action
        for k in range(state.tokens.shape[0]):  # exactly the per-frame passes that steps make
            a = int(state.actions[k])
            self.dynamics.frame_logits(state.tokens[k : k + 1].long(), torch.tensor([null if a < 0 else a]), cache, commit=True)
        return cache


class FrameDecoder:
    """The tokenizer side of a step: prompt frames -> tokens, and each session's newest frame -> pixels."""

    def __init__(self, tokenizer: VideoTokenizer, cache: KVCacheStore | None = None) -> None:
        self.tokenizer = tokenizer.eval()
        self.cache = cache

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        """(B, t, H, W, C) uint8 -> (B, t, N) int32."""
        check_video(frames, self.tokenizer.cfg.frame, self.tokenizer.cfg.max_frames)
        return self.tokenizer.encode(frames).to(torch.int32)

    @torch.no_grad()
    def decode_last(self, states: Sequence[WorldState]) -> Tensor:
        """The last frame of each session's window as pixels: (B, H, W, C) uint8.

        The decoder is causal in time, so the frame depends on the whole window; the cache of the window
        minus its last frame makes that one single-frame pass.
        """
        if not states:
            raise ValueError("no states to decode")
        dec = KVCache.stack([self._cache_for(s.session_id, s.tokens[:-1]) for s in states])
        last = torch.stack([s.tokens[-1] for s in states]).long()  # (B, N)
        frames = to_uint8(self.tokenizer.decode_frame(last, dec))  # (B, H, W, C)
        if self.cache is not None:
            for s, c in zip(states, dec.unstack(), strict=True):
                self.cache.put(_dec_key(s.session_id, s.tokens), c)
        return frames

    def _cache_for(self, session_id: str, tokens: Tensor) -> KVCache:
        if self.cache is not None:
            hit = self.cache.take(_dec_key(session_id, tokens))
            if hit is not None:
                return hit
        if tokens.shape[0] >= self.tokenizer.cfg.max_frames:
            raise ValueError(f"{tokens.shape[0] + 1} frames do not fit the tokenizer window {self.tokenizer.cfg.max_frames}")
        cache = self.tokenizer.new_cache(1)
        for k in range(tokens.shape[0]):  # committing a frame means decoding it, exactly as a step does
            self.tokenizer.decode_frame(tokens[k : k + 1].long(), cache)
        return cache


class World:
    """A playable world: a tokenizer and a dynamics model, stepped with latent actions.

    The model holds no per-session buffers: every call takes WorldStates and returns new ones. The optional
    KVCacheStore keeps what past frames contribute so a step costs the same whatever the history length;
    without it (or on a miss) the caches are recomputed from the state, with identical results.

    When the window of `window` frames is full, the oldest frames are dropped so `keep` remain and the
    caches are rebuilt from those tokens; positions restart at 0, as in training. A hit and a miss
    therefore see exactly the same context.
    """

    def __init__(
        self,
        tokenizer: VideoTokenizer,
        dynamics: DynamicsModel,
        sampling: SamplingConfig | None = None,
        cache: KVCacheStore | None = None,
    ) -> None:
        tcfg, dcfg = tokenizer.cfg, dynamics.cfg
        if (tcfg.vq.num_codes, tcfg.tokens_per_frame) != (dcfg.num_tokens, dcfg.tokens_per_frame):
            raise ValueError(
                f"tokenizer (K={tcfg.vq.num_codes}, N={tcfg.tokens_per_frame}) does not match dynamics "
                f"(K={dcfg.num_tokens}, N={dcfg.tokens_per_frame})"
            )
        if tcfg.max_frames < dcfg.max_frames:
            raise ValueError(f"tokenizer window {tcfg.max_frames} is shorter than dynamics window {dcfg.max_frames}")
        self.sampling = sampling or SamplingConfig()
        self.cache = cache
        self.engine = DynamicsEngine(dynamics, self.sampling.keep_frames, cache)
        self.decoder = FrameDecoder(tokenizer, cache)
        self.window, self.keep = self.engine.window, self.engine.keep

    @property
    def tokenizer(self) -> VideoTokenizer:
        return self.decoder.tokenizer

    @property
    def dynamics(self) -> DynamicsModel:
        return self.engine.dynamics

    @property
    def num_actions(self) -> int:
        return self.engine.num_actions

    @torch.no_grad()
    def reset(
        self, prompt: Tensor, seeds: Sequence[int], session_ids: Sequence[str] | None = None
    ) -> tuple[list[WorldState], Tensor]:
        """Starts B sessions from prompt frames.

        prompt: (B, t0, H, W, C) uint8, 1 <= t0 <= window; seeds: B ints.
        Returns the states and the last prompt frame as the tokenizer reconstructs it, (B, H, W, C) uint8.
        """
        check_video(prompt, self.tokenizer.cfg.frame, self.window)
        b, t0 = prompt.shape[:2]
        if len(seeds) != b or (session_ids is not None and len(session_ids) != b):
            raise ValueError(f"need {b} seeds and session ids, got {len(seeds)} and {len(session_ids or [])}")
        tokens = self.decoder.encode(prompt)  # (B, t0, N)
        states = [
            new_state(session_ids[i] if session_ids is not None else uuid.uuid4().hex, tokens[i], int(seeds[i]))
            for i in range(b)
        ]
        self.engine.prime(states)
        return states, self.decoder.decode_last(states)

    @torch.no_grad()
    def step(
        self, states: Sequence[WorldState], actions: Sequence[int], sampling: SamplingConfig | None = None
    ) -> tuple[list[WorldState], Tensor]:
        """Advances each session by one frame under its action.

        actions: B ints in [0, A). Returns new states (version + 1) and frames (B, H, W, C) uint8.
        """
        tokens = self.engine.next_tokens(states, actions, sampling or self.sampling)  # (B, N)
        new = [advance(s, t, a, self.window, self.keep) for s, t, a in zip(states, tokens, actions, strict=True)]
        return new, self.decoder.decode_last(new)


def new_state(session_id: str, tokens: Tensor, seed: int) -> WorldState:
    """A session's first state from its prompt tokens (t0, N): no actions, version 0."""
    return WorldState(session_id, tokens.to(torch.int32), torch.full((tokens.shape[0],), -1, dtype=torch.int32), seed, 0, 0)
