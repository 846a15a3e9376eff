"""The gateway over real gRPC with the in-process backend: the API, ownership, limits, every bad input, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import io
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from genie.media import load_image
from genie.sampling import SamplingConfig
from genie.worlds import load_prompts, load_world
from genie_api.v1 import gateway_pb2 as pb
from services.backends.inprocess import InProcessBackend
from services.gateway.api.client import GatewayClient, frame_array
from services.gateway.app import Gateway, GatewayConfig
from services.gateway.sessions import Limits
from services.gateway.stores.memory_store import MemoryStore

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"
TOKENS = f"alice:{ALICE},bob:{BOB}"


def _png(world_dir, i=0) -> bytes:
    buf = io.BytesIO()
    Image.open(load_prompts(world_dir)[i]).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
async def gateway(trained_world_dir):
    cfg = GatewayConfig(world=str(trained_world_dir), grpc_port=0, http_port=-1, metrics_port=0, tokens=TOKENS,
                        limits=Limits(max_sessions_per_client=3, requests_per_second=1000, max_prompt_bytes=1 << 20))
    gw = Gateway(cfg, backend=InProcessBackend(trained_world_dir), store=MemoryStore())
    await gw.start()
    yield gw
    await gw.stop()


@pytest.fixture
async def alice(gateway):
    async with GatewayClient(gateway.grpc_address, ALICE) as c:
        yield c


@pytest.fixture
async def bob(gateway):
    async with GatewayClient(gateway.grpc_address, BOB) as c:
        yield c


async def _code(awaitable) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value.code(), info.value.details()


async def test_open_step_get_close(alice, trained_world_dir, tiny_world_cfg):
    opened = await alice.open(image=_png(trained_world_dir), seed=5)
    sid = opened.session.session_id
    h, w = tiny_world_cfg.data.height, tiny_world_cfg.data.width
    assert frame_array(opened.frame).shape == (h, w, 3)
    assert (opened.session.step, opened.session.version, list(opened.session.actions)) == (0, 0, [-1])
    frames = [frame_array(opened.frame)]
    for k, action in enumerate([1, 2, 3]):
        r = await alice.step(sid, action)
        assert (r.step, r.action) == (k + 1, action)
        frames.append(frame_array(r.frame))
    info = await alice.get(sid)
    assert (info.step, info.version, list(info.actions)) == (3, 3, [-1, 1, 2, 3])
    assert info.options.seed == 5 and info.expires_unix > info.created_unix
    assert any(not np.array_equal(frames[0], f) for f in frames[1:])
    await alice.close(sid)
    assert (await _code(alice.step(sid, 0)))[0] == grpc.StatusCode.NOT_FOUND


async def test_frames_equal_a_bare_world_with_the_same_seed(alice, trained_world_dir, tiny_world_cfg):
    """The gateway adds no randomness or drift: it plays exactly what World.step plays."""
    h, w = tiny_world_cfg.data.height, tiny_world_cfg.data.width
    image = _png(trained_world_dir, 1)
    opened = await alice.open(image=image, seed=11, frame_format=pb.FRAME_FORMAT_RAW)
    got = [frame_array(opened.frame)]
    actions = [0, 3, 1, 1, 2, 0, 3, 2, 1]  # longer than the tiny window: slides included
    for a in actions:
        got.append(frame_array((await alice.step(opened.session.session_id, a, pb.FRAME_FORMAT_RAW)).frame))
    world, cfg = load_world(trained_world_dir)
    states, first = world.reset(torch.from_numpy(load_image(image, h, w))[None, None], seeds=[11])
    want = [first[0].numpy()]
    for a in actions:
        states, f = world.step(states, [a], cfg.sampling)
        want.append(f[0].numpy())
    assert all(np.array_equal(g, x) for g, x in zip(got, want, strict=True))


async def test_sampling_options_and_raw_prompt(alice, trained_world_dir, tiny_world_cfg):
    t, h, w = 2, tiny_world_cfg.data.height, tiny_world_cfg.data.width
    frames = np.random.default_rng(0).integers(0, 255, (t, h, w, 3), dtype=np.uint8)
    opened = await alice.open(frames=frames, steps=2, temperature=0.5, seed=3)
    assert opened.session.context_frames == 2
    assert (opened.session.options.steps, opened.session.options.temperature) == (2, 0.5)
    assert (await alice.step(opened.session.session_id, 1)).step == 1


async def test_play_stream_answers_each_step_in_order(alice, trained_world_dir):
    sid = (await alice.open(image=_png(trained_world_dir))).session.session_id
    steps = [r.step async for r in alice.play(sid, [0, 1, 2, 3, 0])]
    assert steps == [1, 2, 3, 4, 5]
    assert (await alice.get(sid)).step == 5


async def test_sessions_are_visible_only_to_their_owner(alice, bob, trained_world_dir):
    sid = (await alice.open(image=_png(trained_world_dir))).session.session_id
    for call in (bob.step(sid, 0), bob.get(sid), bob.close(sid)):
        code, details = await _code(call)
        assert code == grpc.StatusCode.NOT_FOUND and "no session" in details
    assert (await alice.step(sid, 0)).step == 1  # untouched by bob's attempts


async def test_bad_inputs_get_clear_statuses_and_change_nothing(alice, trained_world_dir, tiny_world_cfg, gateway):
    sid = (await alice.open(image=_png(trained_world_dir))).session.session_id
    h, w = tiny_world_cfg.data.height, tiny_world_cfg.data.width
    bad = {
        "corrupt image": alice.open(image=b"\x89PNG\r\n\x1a\n garbage"),
        "empty prompt": alice.open(image=b""),
        "wrong raw size": alice.open(frames=np.zeros((1, h + 1, w, 3), np.uint8)),
        "too many frames": alice.open(frames=np.zeros((50, h, w, 3), np.uint8)),
        "too many sampling steps": alice.open(image=_png(trained_world_dir), steps=10_000),
        "negative temperature": alice.open(image=_png(trained_world_dir), temperature=-1.0),
        "unknown action": alice.step(sid, 99),
        "empty session id": alice.step("", 0),
    }
    for what, call in bad.items():
        code, details = await _code(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (what, code, details)
        assert details, what
    code, _ = await _code(alice.step("0" * 32, 0))
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = await _code(alice.open(image=b"x" * (2 << 20)))  # over the gRPC message cap
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = await alice.get(sid)
    assert (info.step, info.version) == (0, 0)  # nothing above touched the session
    assert (await alice.step(sid, 1)).step == 1


async def test_missing_or_unknown_token_is_unauthenticated(gateway):
    for token in ("", "not-a-real-token-at-all"):
        async with GatewayClient(gateway.grpc_address, token) as c:
            code, details = await _code(c.list_actions())
            assert code == grpc.StatusCode.UNAUTHENTICATED and "token" in details


async def test_session_limit_per_client(alice, bob, trained_world_dir):
    for _ in range(3):
        await alice.open(image=_png(trained_world_dir))
    code, details = await _code(alice.open(image=_png(trained_world_dir)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "sessions" in details
    await bob.open(image=_png(trained_world_dir))  # another client is not affected


@contextlib.asynccontextmanager
async def _gateway_with(world_dir, limits: Limits):
    """A gateway of its own with these limits (the shared fixture's are loose)."""
    cfg = GatewayConfig(world=str(world_dir), grpc_port=0, http_port=-1, metrics_port=-1, tokens=TOKENS, limits=limits)
    gw = Gateway(cfg, backend=InProcessBackend(world_dir), store=MemoryStore())
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


async def test_rate_limit(trained_world_dir):
    async with _gateway_with(trained_world_dir, Limits(requests_per_second=3)) as gw, GatewayClient(gw.grpc_address, ALICE) as c:
        results = await asyncio.gather(*[c.list_actions() for _ in range(8)], return_exceptions=True)
    limited = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert limited and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in limited)
    assert len(results) - len(limited) <= 6  # at most 3 per second, across at most two seconds


async def test_expired_session_is_not_found(trained_world_dir):
    async with _gateway_with(trained_world_dir, Limits(session_ttl_s=0.5)) as gw, GatewayClient(gw.grpc_address, ALICE) as c:
        sid = (await c.open(image=_png(trained_world_dir))).session.session_id
        await c.step(sid, 0)  # refreshes the TTL
        await asyncio.sleep(0.8)
        code, details = await _code(c.step(sid, 0))
        assert code == grpc.StatusCode.NOT_FOUND and "expired" in details


async def test_list_actions_infer_actions(alice, trained_world_dir, tiny_world_cfg):
    listed = await alice.list_actions()
    assert len(listed.actions) == tiny_world_cfg.dynamics.num_actions
    assert (listed.height, listed.width, listed.window) == (16, 16, tiny_world_cfg.dynamics.max_frames)
    assert [a.id for a in listed.actions] == list(range(len(listed.actions)))
    clip = np.random.default_rng(1).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    actions = await alice.infer_actions(clip)
    assert len(actions) == 3 and all(0 <= a < len(listed.actions) for a in actions)
    code, _ = await _code(alice.infer_actions(clip[:1]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_and_reflection(gateway):
    async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "genie.v1.Gateway"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = [s.name async for r in stub.ServerReflectionInfo(ask()) for s in r.list_services_response.service]
        assert "genie.v1.Gateway" in names and "grpc.health.v1.Health" in names


async def test_metrics_count_steps_and_errors_by_code(alice, gateway, trained_world_dir):
    sid = (await alice.open(image=_png(trained_world_dir))).session.session_id
    await alice.step(sid, 0)
    await alice.step(sid, 1)
    await _code(alice.step(sid, 99))
    await _code(alice.step("f" * 32, 0))
    text = urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5).read().decode()
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert lines["genie_gateway_steps_total"] == 2
    assert lines["genie_gateway_sessions_opened_total"] == 1
    assert lines["genie_gateway_step_seconds_count"] == 2
    assert lines['genie_gateway_errors_total{code="INVALID_ARGUMENT",method="Step"}'] == 1
    assert lines['genie_gateway_errors_total{code="NOT_FOUND",method="Step"}'] == 1
    assert lines['genie_gateway_requests_total{code="OK",method="Step"}'] == 2


async def test_default_sampling_is_the_worlds(alice, trained_world_dir, tiny_world_cfg):
    info = (await alice.open(image=_png(trained_world_dir))).session
    default: SamplingConfig = tiny_world_cfg.sampling
    assert (info.options.steps, info.options.temperature) == (default.steps, pytest.approx(default.temperature))


async def test_two_thousand_idle_play_streams_from_one_client_cost_another_client_nothing(trained_world_dir):
    limits = Limits(max_sessions_per_client=3, requests_per_second=100_000, max_streams_per_client=4)
    cfg = GatewayConfig(world=str(trained_world_dir), grpc_port=0, http_port=-1, metrics_port=-1, tokens=TOKENS,
                        limits=limits)
    gw = Gateway(cfg, backend=InProcessBackend(trained_world_dir), store=MemoryStore())
    await gw.start()
    try:
        async with GatewayClient(gw.grpc_address, ALICE) as alice, GatewayClient(gw.grpc_address, BOB) as bob:
            sid = (await bob.open(image=_png(trained_world_dir), seed=1)).session.session_id
            # Alice opens 2,000 Play streams and sends nothing on them: 4 first (held open), then 1,996 more.
            calls = [alice.stub.Play(metadata=alice._metadata, timeout=60) for _ in range(4)]
            await _until(lambda: gw.service.metrics.play_streams._value.get() == 4)
            calls += [alice.stub.Play(metadata=alice._metadata, timeout=60) for _ in range(1996)]
            refused = await asyncio.gather(*(_code(call.read()) for call in calls[4:]))
            assert {code for code, _ in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert "at most 4 open Play streams per client" in refused[0][1]
            assert gw.service.metrics.play_streams._value.get() == 4  # the first 4 stay open, idle
            # Bob is not held up: his own streams and steps are served while Alice's 4 idle streams stay open.
            steps = [r.step async for r in bob.play(sid, [0, 1, 2])]
            assert steps == [1, 2, 3] and (await bob.step(sid, 3)).step == 4
            # Alice's open streams work, and a closed one frees its slot.
            alice_sid = (await alice.open(image=_png(trained_world_dir), seed=2)).session.session_id
            await calls[0].write(pb.StepRequest(session_id=alice_sid, action=1))
            assert (await calls[0].read()).step == 1
            await calls[0].done_writing()
            assert await calls[0].read() == grpc.aio.EOF
            await _until(lambda: gw.service.metrics.play_streams._value.get() == 3)
            assert [r.step async for r in alice.play(alice_sid, [2])] == [2]
            code, _ = await _code(alice.stub.Play(metadata=(("authorization", "Bearer nope-0123456789abcdef"),)).read())
            assert code == grpc.StatusCode.UNAUTHENTICATED  # refused when it opens, not at its first message
            for call in calls[1:4]:
                call.cancel()
    finally:
        await gw.stop()


async def _until(condition, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_a_kv_cache_budget_smaller_than_one_batch_is_refused_at_start(trained_world_dir):
    backend = InProcessBackend(trained_world_dir, max_batch=16, cache_bytes=1 << 10)
    with pytest.raises(ValueError, match="K/V cache budget holds 1 sessions .* fewer than a batch of 16"):
        await backend.start()
    await backend.close()
