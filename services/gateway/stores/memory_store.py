"""In-process session store: the embedded default for a laptop run. Same contract as RedisStore.

Records are kept serialised (state bytes + meta JSON), exactly as Redis keeps them, so both stores exercise
the same round trip. One asyncio lock makes every operation atomic; it serves one gateway process only.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from services.gateway.stores.store import LimitExceeded, SessionRecord


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._sessions: dict[str, tuple[bytes, str, int, float, str]] = {}  # id -> (state, meta, version, expires, owner)
        self._rate: dict[tuple[str, int], int] = {}
        self._lock = asyncio.Lock()

    def _live(self, session_id: str) -> tuple[bytes, str, int, float, str] | None:
        item = self._sessions.get(session_id)
        if item is not None and item[3] <= self._clock():
            del self._sessions[session_id]
            return None
        return item

    async def create(self, record: SessionRecord, max_per_owner: int) -> None:
        async with self._lock:
            if self._count(record.owner) >= max_per_owner:
                raise LimitExceeded(f"client {record.owner!r} already has {max_per_owner} open sessions")
            self._sessions[record.session_id] = (
                record.state.to_bytes(), record.meta_json(), record.version, record.expires, record.owner)

    async def get(self, session_id: str) -> SessionRecord | None:
        async with self._lock:
            item = self._live(session_id)
        return None if item is None else SessionRecord.from_parts(session_id, item[0], item[1])

    async def commit(self, record: SessionRecord, expected_version: int) -> bool:
        async with self._lock:
            item = self._live(record.session_id)
            if item is None or item[2] != expected_version:
                return False
            self._sessions[record.session_id] = (
                record.state.to_bytes(), record.meta_json(), record.version, record.expires, record.owner)
            return True

    async def delete(self, session_id: str) -> bool:
        async with self._lock:
            return self._live(session_id) is not None and self._sessions.pop(session_id, None) is not None

    def _count(self, owner: str) -> int:
        return sum(1 for sid in list(self._sessions) if (item := self._live(sid)) is not None and item[4] == owner)

    async def count(self, owner: str) -> int:
        async with self._lock:
            return self._count(owner)

    async def allow(self, owner: str, per_second: int) -> bool:
        second = math.floor(self._clock())
        async with self._lock:
            for key in [k for k in self._rate if k[1] < second]:
                del self._rate[key]
            n = self._rate.get((owner, second), 0) + 1
            self._rate[(owner, second)] = n
        return n <= per_second

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._sessions.clear()
