"""A full Redis and one whose disk is full: calls answer RESOURCE_EXHAUSTED / UNAVAILABLE naming the cause, sessions
stay as they were, one log line per cause, a metric and /healthz say it, and service comes back once it is freed.

Each test runs a redis-server of its own (real, on a free port), as an operator would configure it: `maxmemory`
with the `noeviction` policy; for the disk, an RDB save point on a tmpfs of a few MB that the test fills."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
import uuid

import aiohttp
import grpc
import pytest
import redis
from PIL import Image

from genie.worlds import load_prompts
from services.backends.inprocess import InProcessBackend
from services.gateway.api.client import GatewayClient
from services.gateway.app import Gateway, GatewayConfig
from services.gateway.stores.redis_store import RedisStore
from tests.own_redis import OwnRedis

ALICE = "alice-token-0123456789"


def _png(world_dir) -> bytes:
    buf = io.BytesIO()
    Image.open(load_prompts(world_dir)[0]).save(buf, format="PNG")
    return buf.getvalue()


def _gateway(world_dir, url: str) -> Gateway:
    config = GatewayConfig(world=str(world_dir), grpc_port=0, http_port=0, metrics_port=-1, tokens=f"alice:{ALICE}",
                           store="redis", redis_url=url)
    return Gateway(config, backend=InProcessBackend(world_dir), store=RedisStore(url, prefix=f"t{uuid.uuid4().hex[:6]}:"))


async def _healthz(gw: Gateway) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{gw.http_port}/healthz") as r:
        return r.status, await r.json()


def _refusals(gw: Gateway, cause: str) -> float:
    return gw.service.metrics.registry.get_sample_value("genie_gateway_store_refusals_total", {"cause": cause}) or 0.0


def _session_bytes(own: OwnRedis, gw: Gateway, sid: str) -> dict:
    return own.client.hgetall(f"{gw.store.prefix}s:{sid}")


async def _refused(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value.details()


async def _until_ok(make_call, timeout_s: float = 5.0):
    """The first success of `make_call()` within `timeout_s`, and how long it took."""
    t0 = time.monotonic()
    while True:
        try:
            return await make_call(), time.monotonic() - t0
        except grpc.aio.AioRpcError:
            if time.monotonic() - t0 > timeout_s:
                raise
            await asyncio.sleep(0.05)


async def test_a_full_redis_answers_resource_exhausted_keeps_every_session_and_recovers(trained_world_dir, tmp_path,
                                                                                      caplog):
    caplog.set_level(logging.INFO)
    own = OwnRedis(tmp_path, "--save", "", "--appendonly", "no", "--maxmemory", "8mb", "--maxmemory-policy",
                   "noeviction")
    own.start()
    gw = _gateway(trained_world_dir, own.url)
    await gw.start()
    try:
        async with GatewayClient(gw.grpc_address, ALICE) as client:
            sid = (await client.open(image=_png(trained_world_dir), seed=3)).session.session_id
            spare = (await client.open(image=_png(trained_world_dir), seed=4)).session.session_id
            for action in (1, 2):
                await client.step(sid, action)
            stored = _session_bytes(own, gw, sid)
            ballast = own.fill()
            assert ballast, "the filler wrote something before Redis was full"

            refused = [
                await _refused(client.open(image=_png(trained_world_dir)), grpc.StatusCode.RESOURCE_EXHAUSTED),
                *[await _refused(client.step(sid, 3), grpc.StatusCode.RESOURCE_EXHAUSTED) for _ in range(5)],
            ]
            assert all("full" in m and "maxmemory" in m for m in refused), refused
            # Nothing changed, reads work, and a close (which frees memory) goes through.
            assert _session_bytes(own, gw, sid) == stored
            assert (await client.get(sid)).step == 2
            await client.close(spare)
            assert _refusals(gw, "full") == len(refused)
            status, health = await _healthz(gw)
            assert (status, health["ready"], health["store"]) == (200, True, "full"), health
            assert "maxmemory" in health["store_message"]

            own.client.delete(*ballast)  # the operator frees memory: no restart of anything
            response, waited = await _until_ok(lambda: client.step(sid, 3))
            assert response.step == 3 and waited < 5.0
            assert (await _healthz(gw))[1]["store"] == "ok"
            assert [a for a in (await client.get(sid)).actions][-3:] == [1, 2, 3]
    finally:
        await gw.stop()
        own.stop()
    lines = [r for r in caplog.records if "session store refused" in r.getMessage()]
    assert len(lines) == 1 and "(full)" in lines[0].getMessage(), [r.getMessage() for r in lines]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def _bgsave(own: OwnRedis, ok: bool, timeout_s: float = 10.0) -> None:
    """Runs a BGSAVE and waits until it finished with the expected outcome."""
    with contextlib.suppress(redis.exceptions.ResponseError):  # "already in progress"
        own.client.bgsave()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = own.client.info("persistence")
        if not info["rdb_bgsave_in_progress"] and (info["rdb_last_bgsave_status"] == "ok") == ok:
            return
        time.sleep(0.05)
    raise AssertionError(f"BGSAVE did not {'succeed' if ok else 'fail'}: {own.client.info('persistence')}")


async def test_redis_whose_disk_is_full_refuses_writes_as_unavailable_and_recovers(trained_world_dir, small_disk, caplog):
    caplog.set_level(logging.INFO)
    disk = small_disk("2m")
    # An RDB save point and the default stop-writes-on-bgsave-error: Redis refuses writes (MISCONF) while its
    # last save failed, so acknowledged data cannot outrun what is on disk.
    own = OwnRedis(disk.path, "--save", "3600 1", "--appendonly", "no")
    own.start()
    gw = _gateway(trained_world_dir, own.url)
    await gw.start()
    try:
        async with GatewayClient(gw.grpc_address, ALICE) as client:
            sid = (await client.open(image=_png(trained_world_dir), seed=5)).session.session_id
            await client.step(sid, 1)
            stored = _session_bytes(own, gw, sid)
            disk.fill()  # the disk fills up: the next snapshot fails
            _bgsave(own, ok=False)

            message = await _refused(client.step(sid, 2), grpc.StatusCode.UNAVAILABLE)
            assert "MISCONF" in message and "disk" in message, message
            # Redis refuses every write now, the rate limit's request counter included: every call is refused.
            await _refused(client.open(image=_png(trained_world_dir)), grpc.StatusCode.UNAVAILABLE)
            await _refused(client.get(sid), grpc.StatusCode.UNAVAILABLE)
            assert _session_bytes(own, gw, sid) == stored
            assert _refusals(gw, "persistence") == 3
            assert (await _healthz(gw))[1]["store"] == "persistence"

            disk.free()  # space again: the next save succeeds and writes are accepted
            _bgsave(own, ok=True)
            response, waited = await _until_ok(lambda: client.step(sid, 2))
            assert response.step == 2 and waited < 5.0
            assert list((await client.get(sid)).actions)[-2:] == [1, 2]
    finally:
        await gw.stop()
        own.stop()
    lines = [r for r in caplog.records if "session store refused" in r.getMessage()]
    assert len(lines) == 1 and "(persistence)" in lines[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
