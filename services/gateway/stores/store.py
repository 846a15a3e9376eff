"""Session records and the store interface; implementations: MemoryStore (embedded default) and RedisStore.

The store holds the truth about every session: its WorldState (token window, actions, seed, step, version),
owner, sampling options and expiry. Steps commit with compare-and-set on the version, so two gateway replicas
stepping one session can never interleave half-updates; the loser re-reads and tries again.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace
from typing import Protocol

from genie.sampling import SamplingConfig
from genie.state import WorldState


class LimitExceeded(Exception):
    """The client already holds its maximum number of sessions."""


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    owner: str  # client id of the token that opened it
    state: WorldState
    sampling: SamplingConfig
    created: float  # unix seconds
    expires: float  # unix seconds; refreshed by every step
    # The world version the session is pinned to ("name@version" in a catalogue; "" = the one world a gateway serves
    # without one) and that version's digest: a session's frames come from exactly this world, whatever is published.
    world: str = ""
    world_digest: str = ""

    @property
    def version(self) -> int:
        return self.state.version

    def meta_json(self) -> str:
        """Everything but the state, as JSON (the state travels as safetensors bytes)."""
        # Every sampling field; a record written before a field existed reads back with that field's default.
        sampling = dataclasses.asdict(self.sampling)
        return json.dumps({"owner": self.owner, "sampling": sampling, "created": self.created, "expires": self.expires,
                           "world": self.world, "world_digest": self.world_digest})

    @classmethod
    def from_parts(cls, session_id: str, state_bytes: bytes, meta_json: str | bytes) -> SessionRecord:
        meta = json.loads(meta_json)
        state = WorldState.from_bytes(state_bytes)
        if state.session_id != session_id:
            raise ValueError(f"stored state belongs to {state.session_id!r}, not {session_id!r}")
        return cls(session_id, meta["owner"], state, SamplingConfig(**meta["sampling"]), meta["created"], meta["expires"],
                   meta.get("world", ""), meta.get("world_digest", ""))

    def advanced(self, state: WorldState, now: float, ttl_s: float) -> SessionRecord:
        return replace(self, state=state, expires=now + ttl_s)


class SessionStore(Protocol):
    """Async session storage with TTL, per-owner counts, atomic versioned commits and a rate counter."""

    async def create(self, record: SessionRecord, max_per_owner: int) -> None:
        """Stores a new session, expiring at record.expires; raises LimitExceeded if the owner is at the limit."""

    async def get(self, session_id: str) -> SessionRecord | None:
        """The live session, or None when it does not exist or has expired."""

    async def commit(self, record: SessionRecord, expected_version: int) -> bool:
        """Replaces the session iff its stored version is `expected_version`; False when it moved on or is gone."""

    async def delete(self, session_id: str) -> bool:
        """Removes the session; False when it did not exist."""

    async def count(self, owner: str) -> int:
        """Live sessions of an owner."""

    async def allow(self, owner: str, per_second: int) -> bool:
        """Counts one request of `owner` in the current second; False when over `per_second`."""

    async def ping(self) -> bool:
        """True when the store answers."""

    async def close(self) -> None: ...


class StoreUnavailable(Exception):
    """The session store cannot serve this call now; nothing was changed. Clients may retry.

    `cause` names why in one word, for the log, the refusal metric and health: "unreachable" (down, or no master
    known yet), "readonly" (a node demoted to replica mid-failover), "persistence" (Redis refuses writes because
    saving to disk failed: MISCONF) or "full" (StoreFull). `code` is the gRPC status the call answers."""

    code = "UNAVAILABLE"

    def __init__(self, message: str, cause: str = "unreachable") -> None:
        super().__init__(message)
        self.cause = cause


class StoreFull(StoreUnavailable):
    """The store is at its memory limit and refuses writes (Redis `maxmemory` with the `noeviction` policy): the
    call answers RESOURCE_EXHAUSTED. Reads and closes still work, and closing sessions frees the memory."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str) -> None:
        super().__init__(message, "full")


class NotReplicated(Exception):
    """The write is on the primary, but fewer replicas than asked acknowledged it in time (Redis WAIT): a
    failover now could lose it. `version` is the version the write stored."""

    def __init__(self, message: str, version: int) -> None:
        super().__init__(message)
        self.version = version
