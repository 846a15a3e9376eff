"""One contract, two session stores: the in-process MemoryStore and RedisStore on the real Redis at 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace

import pytest
import torch

from genie.sampling import SamplingConfig
from genie.state import WorldState
from services.gateway.stores.memory_store import MemoryStore
from services.gateway.stores.redis_store import RedisStore
from services.gateway.stores.store import LimitExceeded, SessionRecord, StoreUnavailable


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture(params=["memory", "redis"])
async def store(request, redis_url):
    clock = Clock()
    if request.param == "memory":
        s = MemoryStore(clock=clock)
    else:
        s = RedisStore(redis_url, prefix=f"genie-test-{uuid.uuid4().hex[:8]}:", clock=clock)
    s.test_clock = clock
    yield s
    await s.close()


def _record(owner="alice", ttl=60.0, version=0, sid=None) -> SessionRecord:
    sid = sid or uuid.uuid4().hex
    tokens = torch.randint(0, 32, (3, 4), dtype=torch.int32)
    state = WorldState(sid, tokens, torch.tensor([-1, 2, 5], dtype=torch.int32), seed=7, version=version, step=version)
    now = time.time()
    return SessionRecord(sid, owner, state, SamplingConfig(steps=3, temperature=1.5, guidance=2.0), now, now + ttl)


def _bump(record: SessionRecord, ttl=60.0) -> SessionRecord:
    s = record.state
    new = WorldState(s.session_id, s.tokens.flip(0).contiguous(), s.actions, s.seed, s.version + 1, s.step + 1)
    return record.advanced(new, time.time(), ttl)


async def test_create_get_round_trip(store):
    rec = _record()
    await store.create(rec, max_per_owner=4)
    got = await store.get(rec.session_id)
    assert got is not None and got.state.equals(rec.state)
    assert (got.owner, got.sampling, got.created, got.expires) == (rec.owner, rec.sampling, rec.created, rec.expires)
    assert await store.get("no-such-session") is None


def test_a_record_written_before_a_sampling_field_existed_reads_with_its_default():
    rec = _record()
    meta = json.loads(rec.meta_json())
    del meta["sampling"]["guidance"]
    old = SessionRecord.from_parts(rec.session_id, rec.state.to_bytes(), json.dumps(meta))
    assert old.sampling == replace(rec.sampling, guidance=1.0)


async def test_commit_is_compare_and_set(store):
    rec = _record()
    await store.create(rec, 4)
    new = _bump(rec)
    assert await store.commit(new, expected_version=0)
    assert not await store.commit(_bump(rec), expected_version=0)  # stale: built from version 0 again
    got = await store.get(rec.session_id)
    assert got.version == 1 and got.state.equals(new.state)


async def test_concurrent_commits_from_one_version_exactly_one_wins(store):
    rec = _record()
    await store.create(rec, 4)
    results = await asyncio.gather(*[store.commit(_bump(rec), 0) for _ in range(12)])
    assert sum(results) == 1
    assert (await store.get(rec.session_id)).version == 1


async def test_delete(store):
    rec = _record()
    await store.create(rec, 4)
    assert await store.delete(rec.session_id)
    assert await store.get(rec.session_id) is None
    assert not await store.delete(rec.session_id)
    assert not await store.commit(_bump(rec), 0)  # a commit cannot resurrect a closed session
    assert await store.get(rec.session_id) is None
    assert await store.count("alice") == 0


async def test_per_owner_limit(store):
    for _ in range(2):
        await store.create(_record("alice"), max_per_owner=2)
    with pytest.raises(LimitExceeded, match="2 open sessions"):
        await store.create(_record("alice"), max_per_owner=2)
    await store.create(_record("bob"), max_per_owner=2)  # limits are per owner
    assert (await store.count("alice"), await store.count("bob")) == (2, 1)


async def test_sessions_expire_and_commits_refresh_the_ttl(store):
    short, long_lived = _record(ttl=0.4), _record(ttl=0.4)
    await store.create(short, 4)
    await store.create(long_lived, 4)
    assert await store.commit(_bump(long_lived, ttl=30.0), 0)
    await asyncio.sleep(0.6)
    assert await store.get(short.session_id) is None
    assert not await store.commit(_bump(short), 0)
    assert (await store.get(long_lived.session_id)).version == 1
    assert await store.count("alice") == 1  # expired sessions do not count against the limit


async def test_rate_limit_counts_per_owner_and_second(store):
    store.test_clock.offset = 1000.25 - time.time() % 1  # fixed fractional second so no boundary is crossed
    got = [await store.allow("alice", 3) for _ in range(5)]
    assert got == [True, True, True, False, False]
    assert await store.allow("bob", 3)
    store.test_clock.offset += 1.0  # the next second starts a new count
    assert await store.allow("alice", 3)


async def test_redis_down_is_unavailable_not_a_crash():
    store = RedisStore("redis://127.0.0.1:1/0", timeout_s=0.5, outage_retries=3)  # the default 10 take ~4 s a call
    assert not await store.ping()
    with pytest.raises(StoreUnavailable, match="unavailable"):
        await store.get("x")
    with pytest.raises(StoreUnavailable):
        await store.create(_record(), 4)
    await store.close()


async def test_a_failover_that_loses_the_scripts_between_check_and_run_is_retried(redis_url, monkeypatch):
    """With replica acknowledgement the write script runs in a pipeline, which checks that the master holds the script
    just before it sends EVALSHA. A failover in between gives a master that never saw it: NoScriptError, the script
    ran nothing. The store loads it and runs the write again (it used to surface as INTERNAL in the chaos soak)."""
    from redis.asyncio.client import Pipeline

    from services.gateway.stores.store import NotReplicated

    store = RedisStore(redis_url, prefix=f"genie-test-{uuid.uuid4().hex[:8]}:", wait_replicas=1, wait_ms=10)
    record = _record()
    with pytest.raises(NotReplicated):  # this Redis has no replica: the write lands, WAIT counts 0
        await store.create(record, max_per_owner=10)
    original, skipped = Pipeline.load_scripts, []

    async def lose_the_scripts_once(self):
        if not skipped:  # the master "changed" after the check: it holds no script
            skipped.append(True)
            await self.immediate_execute_command("SCRIPT", "FLUSH")
            return None
        return await original(self)

    monkeypatch.setattr(Pipeline, "load_scripts", lose_the_scripts_once)
    with pytest.raises(NotReplicated):
        await store.commit(_bump(record), record.version)
    assert skipped and (await store.get(record.session_id)).version == record.version + 1  # the retry committed
    await store.close()
