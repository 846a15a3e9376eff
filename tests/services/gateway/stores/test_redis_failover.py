"""The session store on a real Redis set with failover on loopback (1 master, 1 replica, 3 Sentinels):
kill -9 the master mid-soak and sessions step on with nothing a client saw lost; a step WAIT cannot confirm
answers UNAVAILABLE with the version it committed as, and a client's retry does not step twice."""

from __future__ import annotations

import asyncio
import io
import uuid

import grpc
import pytest
from PIL import Image

from genie.worlds import load_prompts
from harness.redis_ha import RedisHA
from services.backends.inprocess import InProcessBackend
from services.gateway.api.client import GatewayClient, committed_step, step_exactly_once
from services.gateway.app import Gateway, GatewayConfig
from services.gateway.stores.redis_store import RedisStore, RedisTarget

ALICE = "alice-token-0123456789"


@pytest.fixture(scope="module")
def redis_ha(tmp_path_factory):
    with RedisHA(tmp_path_factory.mktemp("redis-ha"), replicas=1, sentinels=3) as ha:
        yield ha


def _png(world_dir) -> bytes:
    buf = io.BytesIO()
    Image.open(load_prompts(world_dir)[0]).save(buf, format="PNG")
    return buf.getvalue()


def _gateway(world_dir, target, prefix, wait_replicas=1, wait_ms=500) -> Gateway:
    cfg = GatewayConfig(world=str(world_dir), grpc_port=0, http_port=-1, metrics_port=-1, tokens=f"alice:{ALICE}")
    store = RedisStore(target, prefix=prefix, wait_replicas=wait_replicas, wait_ms=wait_ms, timeout_s=1.0)
    return Gateway(cfg, backend=InProcessBackend(world_dir), store=store)


def test_sentinel_targets_parse():
    t = RedisTarget.parse("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26380/genie/3")
    assert (t.sentinels, t.master, t.db, t.password) == ((("10.0.0.1", 26379), ("10.0.0.2", 26380)), "genie", 3, "pw")
    t = RedisTarget.parse("redis://:secret@h:1/5", "a:1,b:2", "m")
    assert (t.sentinels, t.master, t.db, t.password) == ((("a", 1), ("b", 2)), "m", 5, "secret")
    assert RedisTarget.parse("redis://h:1/0").sentinels == ()
    for bad in (("redis+sentinel://h:1",), ("redis+sentinel://h:x/m",), ("redis://h/0", "a:1", ""), ("redis://h/0", "a", "m")):
        with pytest.raises(ValueError):
            RedisTarget.parse(*bad)
    with pytest.raises(ValueError, match="sentinel"):
        GatewayConfig(store="redis", redis_sentinels="a:1")


async def test_a_step_wait_cannot_confirm_is_unavailable_with_its_version_and_not_retried_twice(trained_world_dir, redis_ha):
    prefix = f"genie-ha-{uuid.uuid4().hex[:8]}:"
    ok = _gateway(trained_world_dir, redis_ha.target(), prefix, wait_replicas=1)
    short = _gateway(trained_world_dir, redis_ha.target(), prefix, wait_replicas=2, wait_ms=50)  # only 1 replica exists
    await ok.start()
    await short.start()
    try:
        async with GatewayClient(ok.grpc_address, ALICE) as good, GatewayClient(short.grpc_address, ALICE) as bad:
            with pytest.raises(grpc.aio.AioRpcError) as info:  # an open WAIT cannot confirm leaves no session
                await bad.open(image=_png(trained_world_dir), seed=3)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert await short.store.count("alice") == 0
            sid = (await good.open(image=_png(trained_world_dir), seed=3)).session.session_id

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await bad.step(sid, 1)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "version 1" in info.value.details()
            version, response = committed_step(info.value)
            assert (version, response.step, response.action) == (1, 1, 1)
            assert (await good.get(sid)).version == 1  # it did commit: a blind retry would step twice

            response, step = await step_exactly_once([bad], sid, 2, last_step=1)
            assert (response.step, step) == (2, 2), "the retry found its step committed and did not step again"
            assert (await good.get(sid)).version == 2
            assert list((await good.get(sid)).actions)[-2:] == [1, 2]
    finally:
        await ok.stop()
        await short.stop()


async def test_a_commit_on_a_node_demoted_to_replica_is_unavailable(redis_ha):
    """Mid-failover a connection can reach the old master after its demotion. A commit whose version no longer
    matches writes nothing, so its script passes there, but the WAIT after it is refused: that must be UNAVAILABLE
    (the client retries; seen as INTERNAL in a chaos run before), not an internal error."""
    from services.gateway.stores.store import StoreUnavailable
    from tests.services.gateway.stores.test_store_contract import _record

    master = redis_ha.master_port()
    replica = next(p for p in redis_ha.data_ports if p != master)
    store = RedisStore(f"redis://127.0.0.1:{replica}/0", prefix=f"demoted-{uuid.uuid4().hex[:8]}:", wait_replicas=1,
                       wait_ms=100, timeout_s=1.0)
    try:
        with pytest.raises(StoreUnavailable, match="replica"):
            await store.commit(_record(), 0)  # no such session there: the script returns 0, then WAIT is refused
    finally:
        await store.close()


async def test_a_miss_read_from_a_replica_mid_failover_is_unavailable_not_not_found(redis_ha):
    """Mid-failover a connection can land on the old master restarted as a replica that has not synced yet: it
    answers reads from an empty dataset. Through Sentinel a miss is confirmed with ROLE on the same connection: on a
    replica it is UNAVAILABLE (clients retry), on the master it stays a miss (None, NOT_FOUND)."""
    from services.gateway.stores.store import StoreUnavailable

    master = redis_ha.master_port()
    replica = next(p for p in redis_ha.data_ports if p != master)
    store = RedisStore(redis_ha.target(), prefix=f"miss-{uuid.uuid4().hex[:8]}:", timeout_s=1.0)
    try:
        assert await store.get("no-such-session") is None  # on the master: a real miss
        await store._redis.connection_pool.disconnect()

        async def stale_address():  # the Sentinels' answer a moment too late: the node that was master
            return "127.0.0.1", replica

        store._redis.connection_pool.get_master_address = stale_address
        with pytest.raises(StoreUnavailable, match="not the master"):
            await store.get("no-such-session")
    finally:
        await store.close()


async def test_kill_the_master_mid_soak_and_sessions_step_on_losing_nothing_acknowledged(trained_world_dir, redis_ha):
    prefix = f"genie-ha-{uuid.uuid4().hex[:8]}:"
    a, b = _gateway(trained_world_dir, redis_ha.target(), prefix), _gateway(trained_world_dir, redis_ha.target(), prefix)
    await a.start()
    await b.start()
    loop = asyncio.get_running_loop()
    try:
        async with GatewayClient(a.grpc_address, ALICE, 10) as ca, GatewayClient(b.grpc_address, ALICE, 10) as cb:
            sids = [(await ca.open(image=_png(trained_world_dir), seed=i)).session.session_id for i in range(4)]
            acked: dict[str, list[tuple[int, int]]] = {sid: [] for sid in sids}  # (step, action) the client saw
            done = asyncio.Event()

            async def player(sid: str, k: int) -> None:
                step = 0
                while not done.is_set() or step < 6:
                    action = (step + k) % 4
                    response, new_step = await step_exactly_once([ca, cb], sid, action, step, attempts=80)
                    assert new_step == step + 1, f"{sid}: the store went from step {step} to {new_step}"
                    step = new_step
                    acked[sid].append((step, action))

            players = [asyncio.create_task(player(sid, k)) for k, sid in enumerate(sids)]
            await asyncio.sleep(1.0)
            old = await loop.run_in_executor(None, redis_ha.kill_master)
            new = await loop.run_in_executor(None, redis_ha.wait_failover, old)
            before = {sid: len(v) for sid, v in acked.items()}
            await asyncio.sleep(2.0)  # sessions step on against the promoted replica
            done.set()
            await asyncio.wait_for(asyncio.gather(*players), 120)
            await loop.run_in_executor(None, redis_ha.restart, old)  # rejoins as a replica: the next test has two nodes

            assert new != old
            for sid, steps in acked.items():
                assert [s for s, _ in steps] == list(range(1, len(steps) + 1)), "no step number lost or doubled"
                assert len(steps) > before[sid], f"{sid} made no progress after the failover"
                info = await cb.get(sid)
                assert (info.step, info.version) == (len(steps), len(steps)), "every acknowledged step survived"
                window = list(info.actions)[1:]
                assert window == [act for _, act in steps][-len(window):]
    finally:
        await a.stop()
        await b.stop()
