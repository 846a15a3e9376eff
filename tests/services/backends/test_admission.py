"""Overload shedding: AdmissionBackend over the real in-process models, and through the gateway over gRPC.
Past the in-flight bound and the queue a call is refused at once (RESOURCE_EXHAUSTED); one that waits past
the queue timeout or its step's deadline is refused (UNAVAILABLE); a refused step changes no session."""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from genie.sampling import SamplingConfig, new_state
from genie.worlds import load_prompts
from services.backends.admission import AdmissionBackend, AdmissionConfig, AdmissionGate, Overloaded, step_deadline
from services.backends.inprocess import InProcessBackend
from services.cli import main as genie_cli
from services.gateway.api.client import GatewayClient
from services.gateway.app import Gateway, GatewayConfig
from services.gateway.sessions import Limits
from services.gateway.stores.memory_store import MemoryStore

ALICE = "alice-token-0123456789"


@pytest.fixture
async def models(trained_world_dir):
    backend = InProcessBackend(trained_world_dir)
    await backend.start()
    yield backend
    await backend.close()


async def _state(backend):
    spec = backend.spec
    frames = np.zeros((1, spec.height, spec.width, spec.channels), np.uint8)
    return new_state("s", torch.from_numpy(await backend.encode(frames)), seed=1)


async def _outcome(coro) -> str:
    try:
        await coro
        return "OK"
    except Overloaded as exc:
        return exc.code


async def test_past_the_queue_calls_are_refused_at_once_and_queued_ones_served(models):
    adm = AdmissionBackend(models, AdmissionConfig(max_in_flight=1, max_queue=1, queue_timeout_s=60))
    state, sampling = await _state(models), SamplingConfig(steps=2)
    async with adm._admitted():  # hold the only slot: every call from here on must queue
        calls = [asyncio.create_task(_outcome(adm.next_tokens(state, 0, sampling))) for _ in range(5)]
        await asyncio.sleep(0.05)
        refused = [t for t in calls if t.done()]
        assert len(refused) == 4 and all(t.result() == "RESOURCE_EXHAUSTED" for t in refused), "refused without waiting"
        assert adm.waiting == 1
    assert sorted(await asyncio.gather(*calls)) == ["OK"] + ["RESOURCE_EXHAUSTED"] * 4
    assert adm.refused == {"RESOURCE_EXHAUSTED": 4, "UNAVAILABLE": 0}


async def test_backends_sharing_a_gate_share_its_slots_and_queue(models):
    """A catalogue's versions share one admission budget: a slot held through one version's backend makes the other
    version's calls queue, and past the shared queue they are refused."""
    gate = AdmissionGate(AdmissionConfig(max_in_flight=1, max_queue=1, queue_timeout_s=60))
    v1, v2 = AdmissionBackend(models, gate=gate), AdmissionBackend(models, gate=gate)
    state, sampling = await _state(models), SamplingConfig(steps=2)
    async with v1._admitted():
        queued = asyncio.create_task(_outcome(v2.next_tokens(state, 0, sampling)))
        await asyncio.sleep(0.05)
        assert not queued.done() and v2.waiting == v1.waiting == 1
        assert await _outcome(v1.next_tokens(state, 0, sampling)) == "RESOURCE_EXHAUSTED"  # the queue is shared too
    assert await queued == "OK"
    assert v2.refused == v1.refused == {"RESOURCE_EXHAUSTED": 1, "UNAVAILABLE": 0}
    with pytest.raises(ValueError, match="not two that differ"):
        AdmissionBackend(models, AdmissionConfig(max_in_flight=2), gate=gate)


async def test_a_call_waiting_past_its_timeout_or_its_step_deadline_is_unavailable(models):
    adm = AdmissionBackend(models, AdmissionConfig(max_in_flight=1, max_queue=8, queue_timeout_s=0.05))
    state = await _state(models)
    async with adm._admitted():
        assert await _outcome(adm.decode_last(state)) == "UNAVAILABLE"
        with step_deadline(0.01):
            await asyncio.sleep(0.02)  # the step's deadline passes before it asks for a model slot
            assert await _outcome(adm.decode_last(state)) == "UNAVAILABLE"
    assert await _outcome(adm.decode_last(state)) == "OK"  # a free slot: no deadline applies
    assert adm.refused["UNAVAILABLE"] == 2
    with pytest.raises(ValueError):
        AdmissionConfig(max_in_flight=0)


async def test_overloaded_gateway_refuses_steps_without_changing_sessions(trained_world_dir):
    cfg = GatewayConfig(world=str(trained_world_dir), grpc_port=0, http_port=-1, metrics_port=-1, tokens=f"alice:{ALICE}",
                        limits=Limits(requests_per_second=10_000), admission=AdmissionConfig(1, 0, 1.0))
    gw = Gateway(cfg, backend=InProcessBackend(trained_world_dir), store=MemoryStore())
    await gw.start()
    buf = io.BytesIO()
    Image.open(load_prompts(trained_world_dir)[0]).save(buf, format="PNG")
    try:
        async with GatewayClient(gw.grpc_address, ALICE) as client:
            sids = [(await client.open(image=buf.getvalue(), seed=i)).session.session_id for i in range(6)]

            async def step(sid):
                try:
                    return (await client.step(sid, 1)).step
                except grpc.aio.AioRpcError as exc:
                    return exc.code()

            results = await asyncio.gather(*(step(sid) for sid in sids))
            assert 1 in results and grpc.StatusCode.RESOURCE_EXHAUSTED in results, results
            for sid, result in zip(sids, results, strict=True):
                assert (await client.get(sid)).version == (1 if result == 1 else 0), "a refused step changed nothing"
            assert all([(await client.step(sid, 2)).step for sid in sids]), "one at a time, every session steps"
    finally:
        await gw.stop()


def test_serve_rejects_bad_admission_bounds_with_one_error_line(tmp_path):
    result = CliRunner().invoke(genie_cli, ["serve", "--max-queue", "-1", "--http-port", "-1", "--metrics-port", "-1"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and "max_queue" in result.output


async def test_an_admitted_operation_holds_one_slot_for_all_its_model_calls(models):
    adm = AdmissionBackend(models, AdmissionConfig(max_in_flight=1, max_queue=0, queue_timeout_s=0.05))
    state = await _state(models)
    async with adm.admit():  # the only slot: the calls inside must not queue for it again (that would deadlock)
        tokens = await asyncio.wait_for(adm.next_tokens(state, 1, SamplingConfig(steps=2)), 30)
        await asyncio.wait_for(adm.decode_last(state), 30)
        assert await _outcome(asyncio.create_task(_other(adm, state))) == "RESOURCE_EXHAUSTED"  # others are refused
    assert tokens.shape == (models.spec.tokens_per_frame,)


async def _other(adm, state):
    import contextvars

    # A separate context, as another request's handler has: it does not share this one's slot.
    return await asyncio.create_task(adm.decode_last(state), context=contextvars.Context())
