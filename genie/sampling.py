"""The world step: prompt -> tokens, then step(action) -> next frame, batched over sessions, with K/V caches.

Two engines do the work, so that a server can run them as separate services (Triton's `dynamics` and
`tokenizer` models) and still share one definition of a step:

    DynamicsEngine.next_tokens(states, actions)   -> the next frame's tokens   (MaskGIT over the dynamics model)
    FrameDecoder.decode_last(states)              -> the last frame's pixels   (tokenizer decoder)

`advance` is the pure state transition between them; `World` composes all three in process.
"""

from __future__ import annotations

import contextlib
import copy
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from genie.device import resolve_inference_device, resolve_precision
from genie.kvpool import CacheKey, KVPool
from genie.models.common import check_video, to_uint8
from genie.models.dynamics import DynamicsModel
from genie.models.tokenizer import VideoTokenizer
from genie.nn.int8 import keep_freed_memory, quantize_linears
from genie.nn.maskgit import SCHEDULES, counter_uniform, maskgit_decode, noise_key
from genie.nn.st_transformer import STTransformerConfig
from genie.state import WorldState, digest


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 25  # S MaskGIT iterations per frame (Genie paper: 25)
    temperature: float = 2.0  # Genie paper: 2, random sampling
    schedule: str = "cosine"
    choice_temperature: float = 0.0  # Gumbel noise on confidences, annealed (MaskGIT); 0 = off
    keep_frames: int = 0  # frames kept when the window is full and slides; 0 = half the window
    # Classifier-free guidance on the action: logits = null + g * (action - null), where "null" is the same frame
    # predicted with no action (the dynamics trains with action dropout, so it knows both). g > 1 amplifies what the
    # action changes over what the past alone predicts (a walk from a standstill); 1 = off (one pass per iteration,
    # g != 1 costs a second).
    guidance: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.temperature < 0 or self.choice_temperature < 0:
            raise ValueError(f"temperatures must be >= 0, got {self.temperature}, {self.choice_temperature}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if self.keep_frames < 0:
            raise ValueError(f"keep_frames must be >= 0, got {self.keep_frames}")
        if not 0.0 <= self.guidance <= 10.0:
            raise ValueError(f"guidance must be in [0, 10], got {self.guidance}")

    def keep(self, window: int) -> int:
        """Frames kept when a window of `window` frames slides."""
        keep = self.keep_frames or max(1, window // 2)
        if keep >= window:
            raise ValueError(f"keep_frames {keep} must be < window {window}")
        return keep


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


class _Engine:
    """What both engines share: a device, a compute precision, and a pool of per-session K/V slots on the device."""

    def __init__(self, model: torch.nn.Module, cfg: STTransformerConfig, tokens: int, cache_bytes: int,
                 device: str | torch.device, precision: str) -> None:
        self.device = resolve_inference_device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.int8 = precision == "int8"
        self.model = model.eval()
        if next(model.parameters()).device != self.device:
            self.model.to(self.device)
        self.source = self.model  # the model as given (on the device); self.model may become a pre-cast copy
        # The pool is the step's working memory too; cache_bytes=0 only turns off keeping it between steps.
        self.caching = cache_bytes > 0
        self.pool = KVPool(cfg, tokens, cache_bytes, self.device, self.dtype)

    def _precast(self, parts) -> None:
        """On a CPU in bf16: the engine's own copy of its model with the Linear weights of `parts(model)` already in
        bf16. Autocast casts each Linear's fp32 weight at every call (its cast cache holds only tensors that require
        grad), ~10% of a bf16 step on a CPU; pre-cast, the products are the same. Only parts that run under autocast
        alone may be given (norms and embeddings stay fp32, as autocast runs them). In int8: the engine's own copy
        with those Linear layers computed in int8 (`genie.nn.int8`); the caller's model stays fp32."""
        if self.int8:
            self.model = copy.deepcopy(self.model)
            quantize_linears(self.model, parts(self.model))
            keep_freed_memory()  # both make fresh (M, N) buffers at every call: reused, they cost no page faults
            return
        if self.dtype != torch.bfloat16 or self.device.type != "cpu":
            return
        keep_freed_memory()
        self.model = copy.deepcopy(self.model)
        for part in parts(self.model):
            for module in part.modules():
                if isinstance(module, torch.nn.Linear):
                    module.to(self.dtype)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _slots(self, keys: list[CacheKey] | int) -> tuple[list[int], list[bool]]:
        """Slots for a batch: looked up by key, or (an int: the batch size, caching off) fresh ones, all misses."""
        if isinstance(keys, int):
            return self.pool.acquire([("", "uncached", str(i)) for i in range(keys)])
        return self.pool.acquire(keys)

    def _release(self, slots: list[int], keys: list[CacheKey] | None) -> None:
        self.pool.release(slots, keys if self.caching and keys is not None else [None] * len(slots))


def _misses(items: list, slots: list[int], hits: list[bool]) -> tuple[list, list[int]]:
    """The items whose slot missed, and those slots: what a step must recompute."""
    missed = [i for i, hit in enumerate(hits) if not hit]
    return [items[i] for i in missed], [slots[i] for i in missed]


def _by_slot(slots: list[int]) -> list[int]:
    """Row order by slot: a batch of sessions in consecutive slots becomes one view of the pool, not a gather."""
    return sorted(range(len(slots)), key=slots.__getitem__)


class DynamicsEngine(_Engine):
    """MaskGIT next-frame tokens for a batch of sessions, with each session's history cached in a pool slot.

    Args:
        dynamics: the model; moved to `device` (the engine owns it from then on).
        keep_frames: frames kept when a full window slides (0 = half the window).
        cache_bytes: cap of the K/V pool kept between steps (0 = recompute every history every step).
        device: auto | cpu | cuda | cuda:N.  precision: auto (bf16 on a GPU, fp32 on a CPU) | fp32 | bf16 | int8
            (CPU: the Linear layers in int8, the rest in fp32).
        fixed_shapes: attention always spans the whole window (masked) and nothing is read back from the device
            mid-step, so the step could be captured as a CUDA graph; the same tokens as sized shapes.
    """

    def __init__(self, dynamics: DynamicsModel, keep_frames: int = 0, cache_bytes: int = 1 << 30,
                 device: str | torch.device = "cpu", precision: str = "auto", fixed_shapes: bool = False) -> None:
        super().__init__(dynamics, dynamics.cfg.transformer, dynamics.cfg.tokens_per_frame, cache_bytes, device, precision)
        self._precast(lambda m: [m])  # every call of the dynamics model runs under autocast
        self.window = dynamics.cfg.max_frames
        self.keep = SamplingConfig(keep_frames=keep_frames).keep(self.window)
        self.fixed_shapes = fixed_shapes

    @property
    def dynamics(self) -> DynamicsModel:
        return self.model

    @property
    def num_actions(self) -> int:
        return self.dynamics.cfg.num_actions

    def check_actions(self, actions: Sequence[int]) -> None:
        for a in actions:
            if not 0 <= int(a) < self.num_actions:
                raise ValueError(f"action {a} is out of range [0, {self.num_actions})")

    @torch.no_grad()
    def next_tokens(self, states: Sequence[WorldState], actions: Sequence[int], sampling: SamplingConfig) -> Tensor:
        """The next frame's tokens for each session: (B, N) int32 on the CPU. Deterministic in (state, action,
        sampling): the noise is a counter-based hash of the session's (seed, step), so neither batch mates, the
        replica nor the device change a session's tokens."""
        if len(states) != len(actions) or not states:
            raise ValueError(f"need one action per state, got {len(actions)} for {len(states)}")
        self.check_actions(actions)
        slid = [slide(s, self.window, self.keep) for s in states]
        for s in slid:
            if s.tokens.shape[0] >= self.window:
                raise ValueError(f"state holds {s.tokens.shape[0]} frames, more than the window {self.window} allows")
        slots, hits = self._slots([_dyn_key(s.session_id, s.tokens, s.actions) for s in slid] if self.caching else len(slid))
        try:
            self._rebuild(*_misses(slid, slots, hits))
            order = _by_slot(slots)
            rows = [slid[i] for i in order]
            cache = self.pool.batch([slots[i] for i in order], [s.tokens.shape[0] for s in rows], self.fixed_shapes)
            action_in = torch.tensor([int(actions[i]) for i in order], dtype=torch.long, device=self.device)  # (B,)
            keys = torch.tensor([noise_key(s.seed, s.step) for s in rows], dtype=torch.long, device=self.device)  # (B, 2)
            n, mask_id = self.dynamics.cfg.tokens_per_frame, self.dynamics.cfg.mask_id
            with self.autocast():
                tokens = maskgit_decode(
                    self._logits_fn(action_in, cache, sampling.guidance),
                    torch.full((len(rows), n), mask_id, dtype=torch.long, device=self.device),
                    mask_id,
                    lambda iteration, stream, count: counter_uniform(keys, iteration, stream, count),
                    steps=sampling.steps,
                    temperature=sampling.temperature,
                    schedule=sampling.schedule,
                    choice_temperature=sampling.choice_temperature,
                    unknown=n,
                )  # (B, N) in slot order
                self.dynamics.frame_logits(tokens, action_in, cache, commit=True)
            out = torch.empty(len(rows), n, dtype=torch.int32)
            out[order] = tokens.to("cpu", torch.int32)
        except BaseException:
            self._release(slots, None)
            raise
        if self.caching:
            new = [advance(s, row, int(a), self.window, self.keep) for s, row, a in zip(slid, out, actions, strict=True)]
            self._release(slots, [_dyn_key(s.session_id, s.tokens, s.actions) for s in new])
        else:
            self._release(slots, None)
        return out

    def _logits_fn(self, action_in: Tensor, cache, guidance: float):
        """tokens (B, N) -> logits (B, N, K) of the next frame, guided towards the action when guidance != 1."""
        if guidance == 1.0:
            return lambda x: self.dynamics.frame_logits(x, action_in, cache)
        null_in = torch.full_like(action_in, self.dynamics.cfg.null_action)

        def guided(x: Tensor) -> Tensor:
            cond = self.dynamics.frame_logits(x, action_in, cache).float()  # (B, N, K)
            null = self.dynamics.frame_logits(x, null_in, cache).float()
            return null + guidance * (cond - null)

        return guided

    @torch.no_grad()
    def prime(self, states: Sequence[WorldState]) -> None:
        """Builds and keeps the history caches of new sessions, so that their first step is a cache hit."""
        if not self.caching or not states:
            return
        keys = [_dyn_key(s.session_id, s.tokens, s.actions) for s in states]
        slots, hits = self.pool.acquire(keys)
        try:
            self._rebuild(*_misses(list(states), slots, hits))
        except BaseException:
            self._release(slots, None)
            raise
        self._release(slots, keys)

    def _rebuild(self, states: list[WorldState], slots: list[int]) -> None:
        """Fills the slots with the states' histories: the same per-frame passes that steps make, all rows at once.

        Rows advance in lockstep; a row with fewer frames repeats its last one, which lands past its length, where
        nothing reads it.
        """
        if not states:
            return
        order = _by_slot(slots)
        rows = [states[i] for i in order]
        cache = self.pool.batch([slots[i] for i in order], [0] * len(rows))
        null = self.dynamics.cfg.null_action
        actions = [s.actions.tolist() for s in rows]  # read on the host once, not per frame
        with self.autocast():
            for k in range(max(len(a) for a in actions)):
                last = [min(k, len(a) - 1) for a in actions]
                tokens = torch.stack([s.tokens[j] for s, j in zip(rows, last, strict=True)]).to(self.device, torch.long)
                acts = [a[j] for a, j in zip(actions, last, strict=True)]
                action_in = torch.tensor([null if a < 0 else a for a in acts], dtype=torch.long, device=self.device)
                self.dynamics.frame_logits(tokens, action_in, cache, commit=True)


class FrameDecoder(_Engine):
    """The tokenizer side of a step: prompt frames -> tokens, and each session's newest frame -> pixels."""

    def __init__(self, tokenizer: VideoTokenizer, cache_bytes: int = 1 << 30, device: str | torch.device = "cpu",
                 precision: str = "auto") -> None:
        super().__init__(tokenizer, tokenizer.cfg.decoder, tokenizer.cfg.tokens_per_frame, cache_bytes, device, precision)
        self._precast(lambda t: [t.dec_in, t.decoder, t.dec_out])  # the decoder; encode runs in fp32, as it must

    @property
    def tokenizer(self) -> VideoTokenizer:
        return self.model

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        """(B, t, H, W, C) uint8 -> (B, t, N) int32 on the CPU. The encoder and the nearest-code search run in fp32
        whatever the precision: a code must not flip with rounding."""
        check_video(frames, self.tokenizer.cfg.frame, self.tokenizer.cfg.max_frames)
        return self.tokenizer.encode(frames.to(self.device)).to("cpu", torch.int32)

    @torch.no_grad()
    def decode_last(self, states: Sequence[WorldState]) -> Tensor:
        """The last frame of each session's window as pixels: (B, H, W, C) uint8 on the CPU.

        The decoder is causal in time, so the frame depends on the whole window; the cache of the window
        minus its last frame makes that one single-frame pass.
        """
        if not states:
            raise ValueError("no states to decode")
        for s in states:
            if s.tokens.shape[0] > self.tokenizer.cfg.max_frames:
                raise ValueError(f"{s.tokens.shape[0]} frames do not fit the tokenizer window {self.tokenizer.cfg.max_frames}")
        slots, hits = self._slots([_dec_key(s.session_id, s.tokens[:-1]) for s in states] if self.caching else len(states))
        try:
            misses = [(s, slot) for s, slot, h in zip(states, slots, hits, strict=True) if not h and s.tokens.shape[0] > 1]
            self._rebuild([s.tokens[:-1] for s, _ in misses], [slot for _, slot in misses])
            order = _by_slot(slots)
            cache = self.pool.batch([slots[i] for i in order], [states[i].tokens.shape[0] - 1 for i in order])
            last = torch.stack([states[i].tokens[-1] for i in order]).to(self.device, torch.long)  # (B, N)
            with self.autocast():
                pixels = to_uint8(self.tokenizer.decode_frame(last, cache))  # (B, H, W, C)
            frames = torch.empty((len(states), *pixels.shape[1:]), dtype=torch.uint8)
            frames[order] = pixels.cpu()
        except BaseException:
            self._release(slots, None)
            raise
        self._release(slots, [_dec_key(s.session_id, s.tokens) for s in states] if self.caching else None)
        return frames

    def _rebuild(self, histories: list[Tensor], slots: list[int]) -> None:
        """Fills the slots by decoding each history's frames (committing a frame means decoding it, as a step does)."""
        if not histories:
            return
        order = _by_slot(slots)
        rows = [histories[i] for i in order]
        cache = self.pool.batch([slots[i] for i in order], [0] * len(rows))
        with self.autocast():
            for k in range(max(h.shape[0] for h in rows)):
                tokens = torch.stack([h[min(k, h.shape[0] - 1)] for h in rows]).to(self.device, torch.long)
                self.tokenizer.decode_frame(tokens, cache)


class World:
    """A playable world: a tokenizer and a dynamics model, stepped with latent actions.

    The model holds no per-session buffers: every call takes WorldStates and returns new ones. Each engine keeps
    what past frames contribute in a pool of K/V slots on its device (up to `cache_bytes` each), so a step costs
    the same whatever the history length; with cache_bytes=0 (or on a miss) the caches are recomputed from the
    state, with identical results.

    When the window of `window` frames is full, the oldest frames are dropped so `keep` remain and the
    caches are rebuilt from those tokens; positions restart at 0, as in training. A hit and a miss
    therefore see exactly the same context.
    """

    def __init__(
        self,
        tokenizer: VideoTokenizer,
        dynamics: DynamicsModel,
        sampling: SamplingConfig | None = None,
        cache_bytes: int = 1 << 28,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        fixed_shapes: bool = False,
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
        self.engine = DynamicsEngine(dynamics, self.sampling.keep_frames, cache_bytes, device, precision, fixed_shapes)
        self.decoder = FrameDecoder(tokenizer, cache_bytes, device, precision)
        self.window, self.keep = self.engine.window, self.engine.keep

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def cache_counts(self) -> tuple[int, int]:
        """(hits, misses) of both engines' K/V pools since they were made."""
        pools = (self.engine.pool, self.decoder.pool)
        return sum(p.hits for p in pools), sum(p.misses for p in pools)

    @property
    def tokenizer(self) -> VideoTokenizer:
        return self.decoder.source  # the model as given, in fp32 (the engine may run a bf16 copy)

    @property
    def dynamics(self) -> DynamicsModel:
        return self.engine.source

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
