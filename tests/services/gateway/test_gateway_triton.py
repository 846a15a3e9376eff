"""The gateway on the real Triton services: play through them, and Triton going down and coming back."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from genie.worlds import load_prompts
from genie_api.v1 import gateway_pb2 as pb
from services.backends.inprocess import InProcessBackend
from services.backends.triton_backend import TritonBackend
from services.gateway.api.client import GatewayClient, frame_array
from services.gateway.app import Gateway, GatewayConfig
from services.gateway.stores.memory_store import MemoryStore

ALICE = "alice-token-0123456789"


def _png(world_dir) -> bytes:
    buf = io.BytesIO()
    Image.open(load_prompts(world_dir)[0]).save(buf, format="PNG")
    return buf.getvalue()


def _gateway(world_dir, backend) -> Gateway:
    cfg = GatewayConfig(world=str(world_dir), grpc_port=0, http_port=-1, metrics_port=-1, tokens=f"alice:{ALICE}")
    return Gateway(cfg, backend=backend, store=MemoryStore())


async def _play(world_dir, backend, actions) -> list[np.ndarray]:
    gw = _gateway(world_dir, backend)
    await gw.start()
    try:
        async with GatewayClient(gw.grpc_address, ALICE) as client:
            opened = await client.open(image=_png(world_dir), seed=9, frame_format=pb.FRAME_FORMAT_RAW)
            sid = opened.session.session_id
            frames = [frame_array(opened.frame)]
            frames += [frame_array((await client.step(sid, a, pb.FRAME_FORMAT_RAW)).frame) for a in actions]
            return frames
    finally:
        await gw.stop()


async def test_triton_and_in_process_gateways_play_identical_frames(trained_world_dir, triton_server):
    actions = [1, 0, 3, 2, 2, 1, 0, 3, 1]  # past the tiny window: slides included
    via_triton = await _play(trained_world_dir, TritonBackend(triton_server.grpc_url), actions)
    in_process = await _play(trained_world_dir, InProcessBackend(trained_world_dir), actions)
    assert all(np.array_equal(a, b) for a, b in zip(via_triton, in_process, strict=True))


async def test_triton_down_is_unavailable_and_the_gateway_recovers(trained_world_dir, triton_server):
    gw = _gateway(trained_world_dir, TritonBackend(triton_server.grpc_url, timeout_s=5.0))
    await gw.start()
    try:
        async with GatewayClient(gw.grpc_address, ALICE) as client, grpc.aio.insecure_channel(gw.grpc_address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            sid = (await client.open(image=_png(trained_world_dir))).session.session_id
            assert (await client.step(sid, 1)).step == 1
            triton_server.kill()
            try:
                for call in (client.step(sid, 2), client.open(image=_png(trained_world_dir))):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert "model service unavailable" in info.value.details() and triton_server.grpc_url in info.value.details()
                await gw.grpc._update_health()
                reply = await health.Check(health_pb2.HealthCheckRequest(service="genie.v1.Gateway"))
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
                assert (await client.get(sid)).step == 1  # the failed step changed nothing
            finally:
                triton_server.start()
                triton_server.wait_ready(timeout=120)
            assert (await client.step(sid, 2)).step == 2  # same gateway, no restart: it recovers by itself
            await gw.grpc._update_health()
            reply = await health.Check(health_pb2.HealthCheckRequest(service="genie.v1.Gateway"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await gw.stop()


async def test_a_gateway_started_before_triton_serves_once_it_is_up(trained_world_dir, triton_server):
    """Deployments start in any order: the gateway comes up, says NOT_SERVING / UNAVAILABLE, then serves."""
    triton_server.kill()
    try:
        gw = _gateway(trained_world_dir, TritonBackend(triton_server.grpc_url, timeout_s=5.0))
        await gw.start()  # does not fail: the models are not there yet
        async with GatewayClient(gw.grpc_address, ALICE) as client, grpc.aio.insecure_channel(gw.grpc_address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="genie.v1.Gateway"))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.list_actions()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            triton_server.start()
            triton_server.wait_ready(timeout=120)
            listed = await client.list_actions()
            assert len(listed.actions) > 0
            assert [(b.key, b.HasField("action")) for b in listed.keys] == [  # the tiny world binds no key
                ("left", False), ("right", False), ("up", False), ("down", False)]
            sid = (await client.open(image=_png(trained_world_dir))).session.session_id
            assert (await client.step(sid, 1)).step == 1
            await gw.grpc._update_health()
            reply = await health.Check(health_pb2.HealthCheckRequest(service="genie.v1.Gateway"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await gw.stop()
    finally:
        if not triton_server.running:  # leave the shared server up for the tests after this one
            triton_server.start()
            triton_server.wait_ready(timeout=120)
