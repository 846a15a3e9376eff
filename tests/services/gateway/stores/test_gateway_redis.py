"""Several gateway replicas over the real Redis: concurrent steps of one session, restarts, Redis going away."""

from __future__ import annotations

import asyncio
import io
import uuid

import grpc
import numpy as np
import pytest
from PIL import Image

from genie.worlds import load_prompts
from genie_api.v1 import gateway_pb2 as pb
from services.backends.inprocess import InProcessBackend
from services.gateway.api.client import GatewayClient, frame_array
from services.gateway.app import Gateway, GatewayConfig
from services.gateway.stores.redis_store import RedisStore
from tests.own_redis import OwnRedis

ALICE = "alice-token-0123456789"


def _png(world_dir) -> bytes:
    buf = io.BytesIO()
    Image.open(load_prompts(world_dir)[0]).save(buf, format="PNG")
    return buf.getvalue()


def _gateway(world_dir, redis_url, prefix, outage_retries: int = 10, **cfg) -> Gateway:
    config = GatewayConfig(world=str(world_dir), grpc_port=0, http_port=-1, metrics_port=-1, tokens=f"alice:{ALICE}",
                           store="redis", redis_url=redis_url, **cfg)
    store = RedisStore(redis_url, prefix=prefix, outage_retries=outage_retries)
    return Gateway(config, backend=InProcessBackend(world_dir), store=store)


@pytest.fixture
def prefix() -> str:
    return f"genie-test-{uuid.uuid4().hex[:8]}:"


async def test_two_replicas_stepping_one_session_keep_one_consistent_history(trained_world_dir, redis_url, prefix):
    a, b = _gateway(trained_world_dir, redis_url, prefix), _gateway(trained_world_dir, redis_url, prefix)
    await a.start()
    await b.start()
    try:
        async with GatewayClient(a.grpc_address, ALICE) as ca, GatewayClient(b.grpc_address, ALICE) as cb:
            sid = (await ca.open(image=_png(trained_world_dir), seed=1)).session.session_id

            async def player(client, actions):
                return [await client.step(sid, act) for act in actions]

            ra, rb = await asyncio.gather(player(ca, [1] * 6), player(cb, [2] * 6))
            done = ra + rb
            steps = sorted(r.step for r in done)
            assert steps == list(range(1, 13)), "every accepted step got its own step number: none lost, none doubled"
            info = await ca.get(sid)
            assert (info.step, info.version) == (12, 12)
            by_step = {r.step: r.action for r in done}
            window = len(info.actions)  # the session kept the actions of its last frames, in order
            assert list(info.actions)[1:] == [by_step[s] for s in range(12 - window + 2, 13)]
            # Both replicas saw the same session: the last frame each served matches a re-read's history.
            assert await cb.get(sid) == info
    finally:
        await a.stop()
        await b.stop()


async def test_a_gateway_restart_mid_session_loses_nothing(trained_world_dir, redis_url, prefix):
    actions = [1, 3, 0, 2, 2, 1, 0, 3]

    async def play_through(restart_at: int | None) -> list[np.ndarray]:
        gw = _gateway(trained_world_dir, redis_url, prefix)
        await gw.start()
        client = GatewayClient(gw.grpc_address, ALICE)
        sid = (await client.open(image=_png(trained_world_dir), seed=42)).session.session_id
        frames = []
        for k, act in enumerate(actions):
            if k == restart_at:  # the replica goes away; a fresh one (new process state, empty caches) takes over
                await client.close_channel()
                await gw.stop()
                gw = _gateway(trained_world_dir, redis_url, prefix)
                await gw.start()
                client = GatewayClient(gw.grpc_address, ALICE)
            frames.append(frame_array((await client.step(sid, act, pb.FRAME_FORMAT_RAW)).frame))
        assert (await client.get(sid)).step == len(actions)
        await client.close_channel()
        await gw.stop()
        return frames

    uninterrupted, restarted = await play_through(None), await play_through(4)
    assert all(np.array_equal(x, y) for x, y in zip(uninterrupted, restarted, strict=True))


async def test_redis_down_is_unavailable_and_the_session_survives_its_restart(trained_world_dir, tmp_path, redis_url):
    # An append-only file of its own, so a restart keeps the data.
    own = OwnRedis(tmp_path, "--save", "", "--appendonly", "yes", "--appendfsync", "always")
    own.start()
    gw = _gateway(trained_world_dir, own.url, "genie:", outage_retries=3)  # the default 10 take ~4 s a call
    await gw.start()
    try:
        async with GatewayClient(gw.grpc_address, ALICE) as client:
            sid = (await client.open(image=_png(trained_world_dir))).session.session_id
            assert (await client.step(sid, 0)).step == 1
            own.stop()  # Redis dies (SIGKILL)
            for call in (client.step(sid, 1), client.open(image=_png(trained_world_dir)), client.get(sid)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "Redis" in info.value.details()
            own.start()  # back, from its append-only file: the session is intact and steps on from where it was
            assert (await client.step(sid, 1)).step == 2
            assert list((await client.get(sid)).actions)[-2:] == [0, 1]
    finally:
        await gw.stop()
        own.stop()
