"""The model backend interface the gateway (and rollout jobs) call: one session at a time, batched underneath.

Two implementations answer the same contract (tests/services/gateway/test_backend_contract.py):
    InProcessBackend  (services/gateway/inprocess.py)   the world's models in this process; the embedded default
    TritonBackend     (services/gateway/triton_backend.py)  the Triton model services over gRPC

Each call is for one session; a backend batches concurrent calls across sessions itself (a micro-batcher
in process, Triton's dynamic batcher remotely). All arrays are numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from genie.config import WorldConfig
from genie.controls import KEYS, KeyBinding
from genie.sampling import SamplingConfig
from genie.state import WorldState
from genie.worlds import default_action_names, load_action_names, load_key_binding_list, load_world_config_of


class BackendUnavailable(Exception):
    """The model service cannot be reached or is not ready; the call may be retried later."""


class BackendCredentialsRejected(BackendUnavailable):
    """The model service is unreachable because TLS fails on certificates (its certificate does not verify, or it
    refuses this client's): a configuration error that retrying does not mend."""


class BackendError(Exception):
    """The model service failed on a well-formed request."""


@dataclass(frozen=True)
class WorldSpec:
    """What a client and the gateway need to know about the served world."""

    height: int
    width: int
    channels: int
    tokens_per_frame: int  # N
    num_codes: int  # K
    window: int  # frames of history the dynamics model attends to (T)
    keep: int  # frames kept when the window slides
    num_actions: int  # A
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # the world's default sampling
    action_names: tuple[str, ...] = ()
    keys: tuple[KeyBinding, ...] = ()  # the bound arrow keys (WORLD/actions.json "keys"); a key not here is unbound

    def __post_init__(self) -> None:
        if self.action_names and len(self.action_names) != self.num_actions:
            raise ValueError(f"{len(self.action_names)} action names for {self.num_actions} actions")
        for b in self.keys:
            if b.action is not None and b.action >= self.num_actions:
                raise ValueError(f"key {b.key} is bound to action {b.action}; the world has {self.num_actions}")

    def action_name(self, action: int) -> str:
        return self.action_names[action] if self.action_names else f"action {action}"

    def key_bindings(self) -> tuple[KeyBinding, ...]:
        """Every arrow key in KEYS order, bound or not (unbound: action None)."""
        bound = {b.key: b for b in self.keys}
        return tuple(bound.get(k, KeyBinding(k)) for k in KEYS)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> WorldSpec:
        d = dict(d)
        d["sampling"] = SamplingConfig(**d.get("sampling", {}))
        d["action_names"] = tuple(d.get("action_names", ()))
        d["keys"] = tuple(KeyBinding(**k) for k in d.get("keys", ()))  # absent in specs published before keys
        return cls(**d)


def world_spec(cfg: WorldConfig, action_names: Sequence[str] = (), keys: Sequence[KeyBinding] = ()) -> WorldSpec:
    """The WorldSpec of a world config (shared with the Triton services, which publish it)."""
    d, t = cfg.dynamics, cfg.tokenizer
    return WorldSpec(
        height=t.frame.height,
        width=t.frame.width,
        channels=t.frame.channels,
        tokens_per_frame=d.tokens_per_frame,
        num_codes=d.num_tokens,
        window=d.max_frames,
        keep=cfg.sampling.keep(d.max_frames),
        num_actions=d.num_actions,
        sampling=cfg.sampling,
        action_names=tuple(action_names),
        keys=tuple(b for b in keys if b.action is not None),
    )


def world_spec_of(world_dir: Path) -> WorldSpec:
    """The WorldSpec of a world directory, with the action names and arrow key bindings of its actions.json
    (`genie world names`).

    Raises ValueError when the directory is not a world or its actions.json is malformed. Default names
    ("action N") are not stored: an empty `action_names` means the same.
    """
    cfg = load_world_config_of(world_dir)
    names = load_action_names(world_dir, cfg.dynamics.num_actions)
    keys = load_key_binding_list(world_dir, cfg.dynamics.num_actions)
    return world_spec(cfg, () if names == default_action_names(cfg.dynamics.num_actions) else names, keys)


class ModelBackend(Protocol):
    """The three model calls of a play session, plus the LAM. Methods raise ValueError on bad input,
    BackendUnavailable when the models cannot be reached, BackendError on other failures."""

    spec: WorldSpec  # valid after start()

    async def start(self) -> None:
        """Connects / loads the models and fills `spec`; raises BackendUnavailable if they are not there."""

    async def encode(self, frames: np.ndarray) -> np.ndarray:
        """Prompt frames (t, H, W, C) uint8, 1 <= t <= window -> tokens (t, N) int32."""

    async def next_tokens(self, state: WorldState, action: int, sampling: SamplingConfig) -> np.ndarray:
        """The next frame's tokens (N,) int32 for one session under `action`; deterministic in its inputs."""

    async def decode_last(self, state: WorldState) -> np.ndarray:
        """The last frame of the session's window as pixels (H, W, C) uint8."""

    async def infer_actions(self, frames: np.ndarray) -> np.ndarray:
        """Latent actions between consecutive frames (t, H, W, C) uint8, t >= 2 -> (t - 1,) int32."""

    async def ready(self) -> bool:
        """True when every model the backend needs answers."""

    async def close(self) -> None:
        """Releases connections and threads."""


def check_frames(frames: np.ndarray, spec: WorldSpec, min_t: int, max_t: int) -> None:
    """Raises ValueError unless frames are uint8 (t, H, W, C) of the world's size with min_t <= t <= max_t."""
    want = (spec.height, spec.width, spec.channels)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != want:
        raise ValueError(f"frames must be uint8 (t, {', '.join(map(str, want))}), got {frames.dtype} {frames.shape}")
    if not min_t <= frames.shape[0] <= max_t:
        raise ValueError(f"need {min_t} to {max_t} frames, got {frames.shape[0]}")


def check_state(state: WorldState, spec: WorldSpec) -> None:
    """Raises ValueError unless the state's token window fits the world (shape and code range)."""
    t, n = state.tokens.shape
    if n != spec.tokens_per_frame or not 1 <= t <= spec.window:
        raise ValueError(f"state tokens {tuple(state.tokens.shape)} do not fit (1..{spec.window}, {spec.tokens_per_frame})")
    if int(state.tokens.min()) < 0 or int(state.tokens.max()) >= spec.num_codes:
        raise ValueError(f"state tokens out of range [0, {spec.num_codes})")
