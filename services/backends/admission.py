"""Overload shedding for any ModelBackend: a bounded number of model calls in flight, a bounded queue in
front of them, and a per-step deadline, so that past saturation a call is refused at once instead of waiting.

    AdmissionBackend(inner, AdmissionConfig(max_in_flight=8, max_queue=16, queue_timeout_s=0.25))

A call that finds the queue full fails with Overloaded("RESOURCE_EXHAUSTED"); one that waited `queue_timeout_s`
(or past the deadline of the step it belongs to, see `step_deadline`) fails with Overloaded("UNAVAILABLE").
SessionService admits each step (and open, and InferActions) once with `admit()`, before any model work.
Either way the call never reached the model and no session changed: the client may retry (with backoff, or
on another gateway). The gateway maps Overloaded to its code in SessionService._model.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from genie.sampling import SamplingConfig
from genie.spec import WorldSpec
from genie.state import WorldState
from services.backends.backend import BackendUnavailable, ModelBackend

# Monotonic time by which the current step must have been admitted to every model call it makes (None: none).
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("genie_step_deadline", default=None)
# True inside `admit()`: the operation already holds a slot, so its model calls are not admitted one by one
# (a step refused between its two model calls would have wasted the first).
_held: contextvars.ContextVar[bool] = contextvars.ContextVar("genie_admission_held", default=False)


@dataclass(frozen=True)
class AdmissionConfig:
    max_in_flight: int = 32  # model calls running at once; the backend batches these (set >= its batch size)
    max_queue: int = 64  # calls waiting for a slot; one more is refused at once; 0 = no waiting at all
    queue_timeout_s: float = 2.0  # a call that waited this long for a slot is refused

    def __post_init__(self) -> None:
        if self.max_in_flight < 1 or self.max_queue < 0 or self.queue_timeout_s <= 0:
            raise ValueError(f"admission needs max_in_flight >= 1, max_queue >= 0 and queue_timeout_s > 0, got "
                             f"{self.max_in_flight}, {self.max_queue}, {self.queue_timeout_s}")


class Overloaded(BackendUnavailable):
    """Refused before reaching the model; `code` is RESOURCE_EXHAUSTED (queue full) or UNAVAILABLE (waited too long)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def step_deadline(seconds: float) -> Iterator[None]:
    """Within this block, model calls not admitted `seconds` after entering it are refused (0 = no deadline)."""
    token = _deadline.set(time.monotonic() + seconds if seconds > 0 else None)
    try:
        yield
    finally:
        _deadline.reset(token)


class AdmissionGate:
    """The slots, the queue and the refusal counts of one admission budget. One gate may front several backends: a
    catalogue's versions share the process's budget, so loading more versions does not multiply how much model work
    may run or wait at once."""

    def __init__(self, cfg: AdmissionConfig | None = None) -> None:
        self.cfg = cfg or AdmissionConfig()
        self.slots = asyncio.Semaphore(self.cfg.max_in_flight)
        self.waiting = 0  # calls queued for a slot now
        self.refused = {"RESOURCE_EXHAUSTED": 0, "UNAVAILABLE": 0}


class AdmissionBackend:
    """Wraps a ModelBackend with admission control; the same contract, plus Overloaded on the model calls.
    `gate`: share the budget of other backends (default: a gate of this backend's own, from `cfg`)."""

    def __init__(self, inner: ModelBackend, cfg: AdmissionConfig | None = None, gate: AdmissionGate | None = None) -> None:
        if gate is not None and cfg is not None and gate.cfg != cfg:
            raise ValueError("give an admission config or a gate, not two that differ")
        self.inner, self.gate = inner, gate or AdmissionGate(cfg)

    @property
    def cfg(self) -> AdmissionConfig:
        return self.gate.cfg

    @property
    def waiting(self) -> int:
        return self.gate.waiting

    @property
    def refused(self) -> dict[str, int]:
        return self.gate.refused

    @property
    def spec(self) -> WorldSpec:
        return self.inner.spec

    @contextlib.asynccontextmanager
    async def admit(self):
        """Admits a whole operation (a step, an open) once: one slot for all the model calls made inside it, so
        a refusal comes before any model work. Raises Overloaded like a single call."""
        async with self._admitted():
            token = _held.set(True)
            try:
                yield
            finally:
                _held.reset(token)

    @contextlib.asynccontextmanager
    async def _admitted(self):
        if _held.get():  # inside admit(): the slot is already ours
            yield
            return
        gate = self.gate
        if gate.slots.locked():  # every slot busy: queue, within bounds
            if gate.waiting >= self.cfg.max_queue:
                raise self._refuse("RESOURCE_EXHAUSTED", f"model queue full ({self.cfg.max_queue} calls waiting); retry later")
            deadline = _deadline.get()
            timeout = self.cfg.queue_timeout_s
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise self._refuse("UNAVAILABLE", "step deadline passed before a model slot was free; retry later")
            gate.waiting += 1
            try:
                await asyncio.wait_for(gate.slots.acquire(), timeout)
            except TimeoutError:
                raise self._refuse("UNAVAILABLE", f"no model slot free within {timeout * 1000:.0f} ms; retry later") from None
            finally:
                gate.waiting -= 1
        else:
            await gate.slots.acquire()
        try:
            yield
        finally:
            gate.slots.release()

    def _refuse(self, code: str, message: str) -> Overloaded:
        self.gate.refused[code] += 1
        return Overloaded(code, message)

    async def start(self) -> None:
        await self.inner.start()

    async def unload_models(self) -> None:
        """Gives the wrapped backend's models back where it holds them elsewhere (a catalogue version on Triton)."""
        unload = getattr(self.inner, "unload_models", None)
        if unload is not None:
            await unload()

    async def encode(self, frames: np.ndarray) -> np.ndarray:
        async with self._admitted():
            return await self.inner.encode(frames)

    async def next_tokens(self, state: WorldState, action: int, sampling: SamplingConfig) -> np.ndarray:
        async with self._admitted():
            return await self.inner.next_tokens(state, action, sampling)

    async def decode_last(self, state: WorldState) -> np.ndarray:
        async with self._admitted():
            return await self.inner.decode_last(state)

    async def infer_actions(self, frames: np.ndarray) -> np.ndarray:
        async with self._admitted():
            return await self.inner.infer_actions(frames)

    async def ready(self) -> bool:
        return await self.inner.ready()

    async def close(self) -> None:
        await self.inner.close()
