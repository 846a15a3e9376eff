"""The model backend interface the gateway (and rollout jobs) call: one session at a time, batched underneath.

Two implementations answer the same contract (tests/services/backends/test_backend_contract.py):
    InProcessBackend  (services/backends/inprocess.py)   the world's models in this process; the embedded default
    TritonBackend     (services/backends/triton_backend.py)  the Triton model services over gRPC

Each call is for one session; a backend batches concurrent calls across sessions itself (a micro-batcher
in process, Triton's dynamic batcher remotely). All arrays are numpy.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from genie.sampling import SamplingConfig
from genie.spec import WorldSpec
from genie.state import WorldState


class BackendUnavailable(Exception):
    """The model service cannot be reached or is not ready; the call may be retried later."""


class BackendCredentialsRejected(BackendUnavailable):
    """The model service is unreachable because TLS fails on certificates (its certificate does not verify, or it
    refuses this client's): a configuration error that retrying does not mend."""


class BackendError(Exception):
    """The model service failed on a well-formed request."""


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
