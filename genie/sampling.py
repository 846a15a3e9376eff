"""The world step: prompt -> tokens, then step(action) -> next frame, batched over sessions, with a K/V cache."""

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
from genie.state import KVCacheStore, SessionCaches, WorldState


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


def step_generator(seed: int, step: int) -> torch.Generator:
    """The sampling noise of one step depends only on (seed, step): not on batch mates or replicas."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 29
    return torch.Generator().manual_seed(x & 0x7FFFFFFFFFFFFFFF)


class World:
    """A playable world: a tokenizer and a dynamics model, stepped with latent actions.

    The model holds no per-session buffers: every call takes WorldStates and returns new ones. The optional
    KVCacheStore keeps what past frames contribute so a step costs the same whatever the history length;
    without it (or on a miss) the caches are recomputed from the state, with identical results.

    When the window of `window` frames is full, the oldest frames are dropped so `keep_frames` remain and
    the caches are rebuilt from those tokens; positions restart at 0, as in training. A hit and a miss
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
        self.tokenizer = tokenizer.eval()
        self.dynamics = dynamics.eval()
        self.sampling = sampling or SamplingConfig()
        self.cache = cache
        self.window = dcfg.max_frames
        self.keep = self.sampling.keep_frames or max(1, self.window // 2)
        if self.keep >= self.window:
            raise ValueError(f"keep_frames {self.keep} must be < window {self.window}")

    @property
    def num_actions(self) -> int:
        return self.dynamics.cfg.num_actions

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
        tokens = self.tokenizer.encode(prompt).to(torch.int32)  # (B, t0, N)
        states, frames = [], []
        for i in range(b):
            sid = session_ids[i] if session_ids is not None else uuid.uuid4().hex
            state = WorldState(sid, tokens[i], torch.full((t0,), -1, dtype=torch.int32), int(seeds[i]), 0, 0)
            caches, frame = self._build_caches(state)
            if self.cache is not None:
                self.cache.put(state.cache_key, caches)
            states.append(state)
            frames.append(frame)
        return states, torch.cat(frames)

    @torch.no_grad()
    def step(self, states: Sequence[WorldState], actions: Sequence[int]) -> tuple[list[WorldState], Tensor]:
        """Advances each session by one frame under its action.

        actions: B ints in [0, A). Returns new states (version + 1) and frames (B, H, W, C) uint8.
        """
        if len(states) != len(actions) or not states:
            raise ValueError(f"need one action per state, got {len(actions)} for {len(states)}")
        for a in actions:
            if not 0 <= int(a) < self.num_actions:
                raise ValueError(f"action {a} is out of range [0, {self.num_actions})")
        slid = [self._slide(s) for s in states]
        caches = [self._caches_for(new, slid=new is not old) for new, old in zip(slid, states, strict=True)]
        dyn = KVCache.stack([c.dynamics for c in caches])
        dec = KVCache.stack([c.decoder for c in caches])
        action_in = torch.tensor([int(a) for a in actions], dtype=torch.long)  # (B,)
        generators = [step_generator(s.seed, s.step) for s in slid]
        n, mask_id = self.dynamics.cfg.tokens_per_frame, self.dynamics.cfg.mask_id
        sc = self.sampling
        tokens = maskgit_decode(
            lambda x: self.dynamics.frame_logits(x, action_in, dyn),
            torch.full((len(states), n), mask_id, dtype=torch.long),
            mask_id,
            generators,
            steps=sc.steps,
            temperature=sc.temperature,
            schedule=sc.schedule,
            choice_temperature=sc.choice_temperature,
        )  # (B, N)
        self.dynamics.frame_logits(tokens, action_in, dyn, commit=True)
        frames = to_uint8(self.tokenizer.decode_frame(tokens, dec))  # (B, H, W, C)
        new_states = []
        for i, (s, d, e) in enumerate(zip(slid, dyn.unstack(), dec.unstack(), strict=True)):
            new = replace(
                s,
                tokens=torch.cat([s.tokens, tokens[i : i + 1].to(torch.int32)]),
                actions=torch.cat([s.actions, action_in[i : i + 1].to(torch.int32)]),
                version=states[i].version + 1,
                step=s.step + 1,
            )
            if self.cache is not None:
                self.cache.put(new.cache_key, SessionCaches(d, e))
            new_states.append(new)
        return new_states, frames

    def _slide(self, state: WorldState) -> WorldState:
        """Drops the oldest frames when the window has no room for one more."""
        if state.tokens.shape[0] < self.window:
            return state
        actions = state.actions[-self.keep :].clone()
        actions[0] = -1  # what led into the new first frame is outside the context, as in training
        return replace(state, tokens=state.tokens[-self.keep :].clone(), actions=actions)

    def _caches_for(self, state: WorldState, slid: bool) -> SessionCaches:
        if self.cache is not None:
            if slid:  # the context changed: the cached keys/values no longer apply
                self.cache.discard(state.cache_key)
            else:
                hit = self.cache.take(state.cache_key)
                if hit is not None:
                    return hit
        return self._build_caches(state)[0]

    def _build_caches(self, state: WorldState) -> tuple[SessionCaches, Tensor]:
        """Recomputes both caches from the state's tokens, one frame at a time exactly as steps do.

        Returns the caches and the last frame decoded, (1, H, W, C) uint8.
        """
        if state.tokens.shape[0] > self.window:
            raise ValueError(f"state holds {state.tokens.shape[0]} frames, the window is {self.window}")
        dyn, dec = self.dynamics.new_cache(1), self.tokenizer.new_cache(1)
        null = self.dynamics.cfg.null_action
        frame = None
        for k in range(state.tokens.shape[0]):
            tok = state.tokens[k : k + 1].long()  # (1, N)
            a = int(state.actions[k])
            self.dynamics.frame_logits(tok, torch.tensor([null if a < 0 else a]), dyn, commit=True)
            frame = self.tokenizer.decode_frame(tok, dec)
        return SessionCaches(dyn, dec), to_uint8(frame)
