"""A small async Python client of the gateway's gRPC API (used by `genie rollout --gateway`, benchmarks, tests)."""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

import grpc
import numpy as np
from PIL import Image

from genie_api.v1 import gateway_pb2 as pb
from genie_api.v1 import gateway_pb2_grpc as pb_grpc
from services.gateway.security.tls import ClientTLS

# The retry contract: these codes mean "not done, or done and not confirmed: look before you retry". A Step that
# failed with one of them changed nothing, except an UNAVAILABLE carrying COMMITTED_VERSION: that step committed
# as that version, and only a failover could still lose it (GetSession says which; the trailer
# STEP_RESPONSE holds its StepResponse). A call cut off by a dying gateway cannot say either, so before
# retrying a Step, a client compares the session's step with the last one it saw, and sends the retry with
# EXPECT_STEP metadata so that an earlier attempt still running on a slow gateway and the retry cannot both
# apply (`step_exactly_once`).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                       grpc.StatusCode.DEADLINE_EXCEEDED})
COMMITTED_VERSION = "genie-committed-version"
EXPECT_STEP = "genie-expect-step"
STEP_RESPONSE = "genie-step-response-bin"


def committed_step(error: grpc.aio.AioRpcError) -> tuple[int, pb.StepResponse | None] | None:
    """For a Step that failed although it committed (not confirmed durable): (version, its StepResponse)."""
    trailers = dict(error.trailing_metadata() or ())
    if COMMITTED_VERSION not in trailers:
        return None
    raw = trailers.get(STEP_RESPONSE)
    return int(trailers[COMMITTED_VERSION]), (pb.StepResponse.FromString(raw) if raw else None)


async def step_exactly_once(clients: Sequence[GatewayClient], session_id: str, action: int, last_step: int,
                            attempts: int = 50, backoff_s: float = 0.05,
                            on_retry: Callable[[grpc.StatusCode], None] | None = None) -> tuple[pb.StepResponse | None, int]:
    """Steps a session once, for its only writer, over gateways `clients` (tried in turn on retryable codes).

    `last_step` is the session's step as this writer last saw it. Returns (response, step): the response is
    None when the step is known to have happened but its response was lost with a dying gateway. Raises the
    last error when a non-retryable code comes or `attempts` run out. `on_retry(code)` sees each retried failure.
    """
    uncertain, pending, k = False, None, random.randrange(len(clients))
    for attempt in range(attempts):
        client = clients[(k + attempt) % len(clients)]
        try:
            if uncertain:  # the last try may have committed: look before stepping again
                session = await client.get(session_id)
                if session.step > last_step:
                    return (pending if pending is not None and pending.step == session.step else None), session.step
                uncertain = False
            # expect_step: if an earlier attempt is still running on a gateway we gave up on, at most one applies.
            response = await client.step(session_id, action, expect_step=last_step)
            return response, response.step
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE or attempt == attempts - 1:
                raise
            if on_retry is not None:
                on_retry(exc.code())
            uncertain = uncertain or exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                                    grpc.StatusCode.ABORTED)
            committed = committed_step(exc)
            if committed is not None:
                pending = committed[1]
            await asyncio.sleep(backoff_s * random.uniform(0.5, 1.5) * min(2 ** attempt, 20))
    raise AssertionError("unreachable")


def frame_array(frame: pb.Frame) -> np.ndarray:
    """A Frame message (PNG or raw) as (H, W, C) uint8."""
    if frame.format == pb.FRAME_FORMAT_RAW:
        return np.frombuffer(frame.data, dtype=np.uint8).reshape(frame.height, frame.width, frame.channels)
    with Image.open(io.BytesIO(frame.data)) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)


def raw_frames(frames: np.ndarray) -> pb.RawFrames:
    """(t, H, W, C) uint8 -> RawFrames."""
    t, h, w, c = frames.shape
    return pb.RawFrames(count=t, height=h, width=w, channels=c, data=np.ascontiguousarray(frames, dtype=np.uint8).tobytes())


class GatewayClient:
    """`async with GatewayClient("127.0.0.1:50051", token) as c: s = await c.open(image=png); f = await c.step(s, 3)`."""

    def __init__(self, address: str, token: str, timeout_s: float = 30.0, tls: ClientTLS | None = None) -> None:
        """`tls`: dial a TLS gateway, verifying its certificate against `tls.ca` (and presenting `tls.cert` for
        mutual TLS); None dials plaintext."""
        self.address, self.timeout_s = address, timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),)
        options = [("grpc.max_receive_message_length", 64 << 20)]
        if tls is None:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self.channel = grpc.aio.secure_channel(address, tls.channel_credentials(), options=options + tls.channel_options())
        self.stub = pb_grpc.GatewayStub(self.channel)

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close_channel()

    async def close_channel(self) -> None:
        await self.channel.close()

    def _kw(self) -> dict:
        return {"metadata": self._metadata, "timeout": self.timeout_s}

    async def open(self, image: bytes | None = None, frames: np.ndarray | None = None, steps: int = 0,
                   temperature: float | None = None, seed: int | None = None,
                   frame_format: int = pb.FRAME_FORMAT_PNG, world: str = "") -> pb.OpenSessionResponse:
        """A new session on `world` ("" = the gateway's default, "name", or "name@version")."""
        options = pb.SamplingOptions(steps=steps, temperature=temperature, seed=seed)
        if frames is not None:
            request = pb.OpenSessionRequest(frames=raw_frames(frames), options=options, frame_format=frame_format,
                                            world=world)
        else:
            request = pb.OpenSessionRequest(image=image or b"", options=options, frame_format=frame_format, world=world)
        return await self.stub.OpenSession(request, **self._kw())

    async def step(self, session_id: str, action: int, frame_format: int = pb.FRAME_FORMAT_PNG,
                   expect_step: int | None = None) -> pb.StepResponse:
        """One step; with `expect_step`, only if the session is at that step (else ABORTED)."""
        kw = self._kw()
        if expect_step is not None:
            kw["metadata"] = (*self._metadata, (EXPECT_STEP, str(expect_step)))
        return await self.stub.Step(pb.StepRequest(session_id=session_id, action=action, frame_format=frame_format), **kw)

    async def play(self, session_id: str, actions: Iterable[int],
                   frame_format: int = pb.FRAME_FORMAT_PNG) -> AsyncIterator[pb.StepResponse]:
        """Streams one Step per action over a single Play call."""

        async def requests():
            for a in actions:
                yield pb.StepRequest(session_id=session_id, action=a, frame_format=frame_format)

        call = self.stub.Play(requests(), metadata=self._metadata)
        async for response in call:
            yield response

    async def get(self, session_id: str) -> pb.Session:
        return await self.stub.GetSession(pb.GetSessionRequest(session_id=session_id), **self._kw())

    async def close(self, session_id: str) -> None:
        await self.stub.CloseSession(pb.CloseSessionRequest(session_id=session_id), **self._kw())

    async def list_actions(self, world: str = "", session_id: str = "") -> pb.ListActionsResponse:
        """The actions of `world`, or of the world the session `session_id` is pinned to (default: the default world)."""
        return await self.stub.ListActions(pb.ListActionsRequest(world=world, session_id=session_id), **self._kw())

    async def infer_actions(self, frames: np.ndarray, world: str = "") -> list[int]:
        request = pb.InferActionsRequest(frames=raw_frames(frames), world=world)
        response = await self.stub.InferActions(request, **self._kw())
        return list(response.actions)

    async def list_worlds(self) -> pb.ListWorldsResponse:
        return await self.stub.ListWorlds(pb.ListWorldsRequest(), **self._kw())
