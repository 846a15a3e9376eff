"""The retry contract over real gRPC: `genie-expect-step` makes a Step apply only to the session at that step,
so a retry and an earlier attempt still running elsewhere cannot both apply; `step_exactly_once` uses it."""

from __future__ import annotations

import io

import grpc
import pytest
from PIL import Image

from genie.worlds import load_prompts
from genie_api.v1 import gateway_pb2 as pb
from services.backends.inprocess import InProcessBackend
from services.gateway.api.client import EXPECT_STEP, GatewayClient, step_exactly_once
from services.gateway.app import Gateway, GatewayConfig
from services.gateway.stores.memory_store import MemoryStore

ALICE = "alice-token-0123456789"


@pytest.fixture
async def client(trained_world_dir):
    cfg = GatewayConfig(world=str(trained_world_dir), grpc_port=0, http_port=-1, metrics_port=-1, tokens=f"alice:{ALICE}")
    gw = Gateway(cfg, backend=InProcessBackend(trained_world_dir), store=MemoryStore())
    await gw.start()
    async with GatewayClient(gw.grpc_address, ALICE) as c:
        yield c
    await gw.stop()


async def test_a_step_expecting_another_step_is_aborted_and_changes_nothing(client, trained_world_dir):
    buf = io.BytesIO()
    Image.open(load_prompts(trained_world_dir)[0]).save(buf, format="PNG")
    sid = (await client.open(image=buf.getvalue(), seed=2)).session.session_id
    assert (await client.step(sid, 1, expect_step=0)).step == 1
    with pytest.raises(grpc.aio.AioRpcError) as info:  # a retry of step 1 that already landed
        await client.step(sid, 1, expect_step=0)
    assert info.value.code() == grpc.StatusCode.ABORTED and "at step 1" in info.value.details()
    assert (await client.get(sid)).step == 1
    bad = (("authorization", f"Bearer {ALICE}"), (EXPECT_STEP, "one"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.Step(pb.StepRequest(session_id=sid, action=1), metadata=bad, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The writer's helper: told the session was at step 0 (its answer to step 1 was lost), it finds step 1 there
    # and reports it as done instead of stepping again.
    response, step = await step_exactly_once([client], sid, 1, last_step=0)
    assert (response, step) == (None, 1) and (await client.get(sid)).step == 1
    response, step = await step_exactly_once([client], sid, 2, last_step=1)
    assert (response.step, step, response.action) == (2, 2, 2)
