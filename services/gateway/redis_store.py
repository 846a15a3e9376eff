"""Redis session store: the truth about every session, shared by all gateway replicas.

Layout (prefix `genie:` by default):
    <p>s:<id>       hash {state: safetensors bytes, meta: JSON, version, owner}, expiring at the session's expiry
    <p>o:<owner>    sorted set of the owner's session ids scored by expiry (ms), for the per-client limit
    <p>r:<owner>:<second>   request counter for the rate limit, expires after 2 s
Each mutation is one Lua script, so it is atomic: a commit checks the stored version and writes only if it
is the one the step started from (compare-and-set), and a create checks the owner's count in the same step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.gateway.store import LimitExceeded, SessionRecord, StoreUnavailable

T = TypeVar("T")

_CREATE = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[7])
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[8]) then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'meta', ARGV[3], 'version', ARGV[4], 'owner', ARGV[5])
redis.call('PEXPIREAT', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
local t = redis.call('PEXPIRETIME', KEYS[2])
if t < tonumber(ARGV[6]) then redis.call('PEXPIREAT', KEYS[2], ARGV[6]) end
return 1
"""

_COMMIT = """
local v = redis.call('HGET', KEYS[1], 'version')
if (not v) or v ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'meta', ARGV[3], 'version', ARGV[4])
redis.call('PEXPIREAT', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[6])
local t = redis.call('PEXPIRETIME', KEYS[2])
if t < tonumber(ARGV[5]) then redis.call('PEXPIREAT', KEYS[2], ARGV[5]) end
return 1
"""

_DELETE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[1] .. owner, ARGV[2])
return 1
"""


class RedisStore:
    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "genie:", timeout_s: float = 2.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.url, self.prefix, self._clock = url, prefix, clock
        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._create = self._redis.register_script(_CREATE)
        self._commit = self._redis.register_script(_COMMIT)
        self._delete = self._redis.register_script(_DELETE)

    def _skey(self, session_id: str) -> str:
        return f"{self.prefix}s:{session_id}"

    def _okey(self, owner: str) -> str:
        return f"{self.prefix}o:{owner}"

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"session store (Redis at {self.url}) unavailable during {what}: {exc}") from exc

    async def create(self, record: SessionRecord, max_per_owner: int) -> None:
        now_ms, exp_ms = int(self._clock() * 1000), int(record.expires * 1000)
        args = [record.session_id, record.state.to_bytes(), record.meta_json(), record.version, record.owner, exp_ms,
                now_ms, max_per_owner]
        keys = [self._skey(record.session_id), self._okey(record.owner)]
        ok = await self._call("create", lambda: self._create(keys=keys, args=args))
        if not ok:
            raise LimitExceeded(f"client {record.owner!r} already has {max_per_owner} open sessions")

    async def get(self, session_id: str) -> SessionRecord | None:
        state, meta = await self._call("get", lambda: self._redis.hmget(self._skey(session_id), "state", "meta"))
        if state is None or meta is None:
            return None
        return SessionRecord.from_parts(session_id, state, meta)

    async def commit(self, record: SessionRecord, expected_version: int) -> bool:
        keys = [self._skey(record.session_id), self._okey(record.owner)]
        args = [str(expected_version), record.state.to_bytes(), record.meta_json(), record.version,
                int(record.expires * 1000), record.session_id]
        return bool(await self._call("commit", lambda: self._commit(keys=keys, args=args)))

    async def delete(self, session_id: str) -> bool:
        args = [f"{self.prefix}o:", session_id]
        return bool(await self._call("delete", lambda: self._delete(keys=[self._skey(session_id)], args=args)))

    async def count(self, owner: str) -> int:
        async def op() -> int:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zremrangebyscore(self._okey(owner), "-inf", int(self._clock() * 1000))
                pipe.zcard(self._okey(owner))
                return (await pipe.execute())[1]

        return await self._call("count", op)

    async def allow(self, owner: str, per_second: int) -> bool:
        key = f"{self.prefix}r:{owner}:{math.floor(self._clock())}"

        async def op() -> int:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, 2)
                return (await pipe.execute())[0]

        return await self._call("rate limit", op) <= per_second

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisConnectionError, RedisTimeoutError, OSError):
            return False

    async def memory_usage(self, session_id: str) -> int:
        """Bytes Redis uses for one session's hash (MEMORY USAGE), for capacity planning."""
        return int(await self._call("memory usage", lambda: self._redis.memory_usage(self._skey(session_id), samples=0)) or 0)

    async def close(self) -> None:
        await self._redis.aclose()
