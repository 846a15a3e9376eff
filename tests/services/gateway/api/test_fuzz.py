"""Property-based fuzzing of every RPC over real gRPC, both backends and both stores: well-formed requests with
arbitrary field values get only documented status codes (never UNKNOWN or INTERNAL) and change no session they
should not; undecodable bytes get INVALID_ARGUMENT, a bounded number of log lines, and the server stays up.

Seeded (derandomize) and bounded: GENIE_FUZZ_EXAMPLES examples per gateway (default 100). With GENIE_FUZZ_REPORT
set, the tally of (method, code) is written there as JSON (benchmarks/fuzz.py runs this file with a big budget).
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from genie.worlds import load_prompts
from genie_api.v1 import gateway_pb2 as pb
from genie_api.v1 import gateway_pb2_grpc as pb_grpc
from services.backends.inprocess import InProcessBackend
from services.backends.triton_backend import TritonBackend
from services.gateway.app import Gateway, GatewayConfig
from services.gateway.sessions import Limits
from services.gateway.stores.memory_store import MemoryStore
from services.gateway.stores.redis_store import RedisStore
from tests.services.gateway.api.fuzz_requests import requests

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"
EXAMPLES = int(os.environ.get("GENIE_FUZZ_EXAMPLES", "100"))
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}
TALLY: Counter = Counter()
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if path := os.environ.get("GENIE_FUZZ_REPORT"):
        with open(path, "a") as f:
            f.write(json.dumps({f"{m} {c}": n for (m, c), n in sorted(TALLY.items())}) + "\n")


def _png(world_dir) -> bytes:
    buf = io.BytesIO()
    Image.open(load_prompts(world_dir)[0]).save(buf, format="PNG")
    return buf.getvalue()


GATEWAYS = ["inprocess-memory", "inprocess-redis", "triton-memory", "triton-redis"]


@pytest.fixture(params=GATEWAYS)
async def fuzz_gateway(request, trained_world_dir):
    backend_kind, store_kind = request.param.split("-")
    if backend_kind == "triton":
        backend = TritonBackend(request.getfixturevalue("triton_server").grpc_url, timeout_s=30.0)
    else:
        backend = InProcessBackend(trained_world_dir)
    if store_kind == "redis":
        store = RedisStore(request.getfixturevalue("redis_url"), prefix=f"genie-fuzz-{uuid.uuid4().hex[:8]}:")
    else:
        store = MemoryStore()
    limits = Limits(max_sessions_per_client=64, requests_per_second=1 << 20, max_prompt_bytes=1 << 20)
    cfg = GatewayConfig(world=str(trained_world_dir), grpc_port=0, http_port=-1, metrics_port=-1,
                        tokens=f"alice:{ALICE},bob:{BOB}", limits=limits)
    gw = Gateway(cfg, backend=backend, store=store)
    gw.fuzz_offset = GATEWAYS.index(request.param)
    await gw.start()
    yield gw
    await gw.stop()


class Fuzzer:
    """Sends requests as alice; tracks what every live session must look like after each one."""

    def __init__(self, gw: Gateway, png: bytes) -> None:
        self.channel = grpc.aio.insecure_channel(gw.grpc_address)
        self.stub = pb_grpc.GatewayStub(self.channel)
        self.alice, self.bob = (("authorization", f"Bearer {ALICE}"),), (("authorization", f"Bearer {BOB}"),)
        self.png, self.expected = png, {}  # session id -> (owner metadata, step)
        self.last_error = ""

    async def open(self, who) -> str:
        r = await self.stub.OpenSession(pb.OpenSessionRequest(image=self.png), metadata=who, timeout=30)
        self.expected[r.session.session_id] = (who, 0)
        return r.session.session_id

    async def call(self, method: str, request) -> list[grpc.StatusCode]:
        """The status code of each answer (Play: one per streamed step, then the stream's end)."""
        codes = []
        try:
            if method == "Play":  # one request, one answer, like a player: no write racing the server's end
                call = self.stub.Play(metadata=self.alice, timeout=60)
                for step in request:
                    await call.write(step)
                    r = await call.read()
                    codes.append(grpc.StatusCode.OK)
                    self._stepped(r.session_id, r.step)
                await call.done_writing()
                if (code := await call.code()) != grpc.StatusCode.OK:
                    codes.append(code)
            else:
                r = await getattr(self.stub, method)(request, metadata=self.alice, timeout=60)
                codes.append(grpc.StatusCode.OK)
                if method == "Step":
                    self._stepped(r.session_id, r.step)
                elif method == "OpenSession":  # a fuzzed open that worked: close it, to stay under the limit
                    await self.stub.CloseSession(pb.CloseSessionRequest(session_id=r.session.session_id),
                                                 metadata=self.alice, timeout=30)
                elif method == "CloseSession":
                    self.expected.pop(request.session_id)
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())
            self.last_error = exc.details()
        return codes

    def _stepped(self, sid: str, step: int) -> None:
        who, was = self.expected[sid]
        assert (who, step) == (self.alice, was + 1), f"{sid} stepped from {was} to {step}"
        self.expected[sid] = (who, step)

    async def check_sessions(self) -> None:
        for sid, (who, step) in self.expected.items():
            s = await self.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=who, timeout=30)
            assert (s.step, s.version) == (step, step), f"session {sid} changed: {s.step} != {step}"

    async def close(self) -> None:
        await self.channel.close()


@pytest.fixture
async def fuzzer(fuzz_gateway, trained_world_dir):
    f = Fuzzer(fuzz_gateway, _png(trained_world_dir))
    yield f
    await f.close()


@FUZZ
@given(data=st.data())
async def test_well_formed_requests_get_documented_codes_and_change_no_other_session(fuzz_gateway, fuzzer, data):
    spec = fuzz_gateway.service.spec
    if not fuzzer.expected:
        await fuzzer.open(fuzzer.alice)
        await fuzzer.open(fuzzer.bob)
    known = list(fuzzer.expected)
    # The seed is the test's, the same for every gateway: a few bytes drawn first give each gateway its own requests.
    data.draw(st.binary(min_size=fuzz_gateway.fuzz_offset, max_size=fuzz_gateway.fuzz_offset), label="offset")
    method, request = data.draw(requests(spec.height, spec.width, spec.window, known, spec.num_actions), label="request")
    codes = await fuzzer.call(method, request)
    TALLY.update((method, c.name) for c in codes)
    assert set(codes) <= DOCUMENTED, f"{method} answered {codes} ({fuzzer.last_error}) to {request!r:.300}"
    await fuzzer.check_sessions()
    if not any(who == fuzzer.alice for who, _ in fuzzer.expected.values()):
        await fuzzer.open(fuzzer.alice)  # the fuzz closed alice's session: give it another


@settings(max_examples=max(EXAMPLES, 60), derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=8))
async def test_garbage_bytes_are_invalid_argument_and_keep_the_server_up(fuzz_gateway, garbage):
    async with grpc.aio.insecure_channel(fuzz_gateway.grpc_address) as ch:
        meta = (("authorization", f"Bearer {ALICE}"),)
        for i, blob in enumerate(garbage):
            method = pb.DESCRIPTOR.services_by_name["Gateway"].methods[i % 7]
            path = f"/genie.v1.Gateway/{method.name}"
            try:
                if method.client_streaming:
                    async for _ in ch.stream_stream(path)(iter([blob]), metadata=meta, timeout=30):
                        pass
                else:
                    await ch.unary_unary(path)(blob, metadata=meta, timeout=30)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            TALLY[(f"garbage {method.name}", code.name)] += 1
            assert code in DOCUMENTED, f"{method.name} answered {code} to {blob!r}"
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_stream_of_garbage_logs_one_line_per_cause(trained_world_dir, caplog):
    cfg = GatewayConfig(world=str(trained_world_dir), grpc_port=0, http_port=-1, metrics_port=-1, tokens=f"alice:{ALICE}")
    gw = Gateway(cfg, backend=InProcessBackend(trained_world_dir), store=MemoryStore())
    await gw.start()
    try:
        caplog.set_level(logging.INFO)
        async with grpc.aio.insecure_channel(gw.grpc_address) as ch:
            call = ch.unary_unary("/genie.v1.Gateway/Step")
            codes = Counter()
            for i in range(500):
                try:
                    await call(b"\xff\xff\xff" + bytes([i % 256]), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code()] += 1
            assert codes == {grpc.StatusCode.INVALID_ARGUMENT: 500}
            lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]
            assert "not a valid genie.v1.StepRequest" in lines[0].getMessage()
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await gw.stop()


async def test_raw_frame_dimensions_whose_product_wraps_to_the_data_size_are_invalid(fuzz_gateway):
    # 65536^4 = 2^64 wraps to 0 in int64, which once matched 0 bytes of data and failed later as INTERNAL.
    wrap = pb.RawFrames(count=65536, height=65536, width=65536, channels=65536, data=b"")
    async with grpc.aio.insecure_channel(fuzz_gateway.grpc_address) as ch:
        stub, meta = pb_grpc.GatewayStub(ch), (("authorization", f"Bearer {ALICE}"),)
        for call, request in ((stub.InferActions, pb.InferActionsRequest(frames=wrap)),
                              (stub.OpenSession, pb.OpenSessionRequest(frames=wrap))):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(request, metadata=meta, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
