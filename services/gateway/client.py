"""A small async Python client of the gateway's gRPC API (used by `genie rollout --gateway`, benchmarks, tests)."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterable

import grpc
import numpy as np
from PIL import Image

from genie_api.v1 import gateway_pb2 as pb
from genie_api.v1 import gateway_pb2_grpc as pb_grpc


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

    def __init__(self, address: str, token: str, timeout_s: float = 30.0) -> None:
        self.address, self.timeout_s = address, timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.channel = grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
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
                   frame_format: int = pb.FRAME_FORMAT_PNG) -> pb.OpenSessionResponse:
        options = pb.SamplingOptions(steps=steps, temperature=temperature, seed=seed)
        if frames is not None:
            request = pb.OpenSessionRequest(frames=raw_frames(frames), options=options, frame_format=frame_format)
        else:
            request = pb.OpenSessionRequest(image=image or b"", options=options, frame_format=frame_format)
        return await self.stub.OpenSession(request, **self._kw())

    async def step(self, session_id: str, action: int, frame_format: int = pb.FRAME_FORMAT_PNG) -> pb.StepResponse:
        return await self.stub.Step(pb.StepRequest(session_id=session_id, action=action, frame_format=frame_format), **self._kw())

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

    async def list_actions(self) -> pb.ListActionsResponse:
        return await self.stub.ListActions(pb.ListActionsRequest(), **self._kw())

    async def infer_actions(self, frames: np.ndarray) -> list[int]:
        response = await self.stub.InferActions(pb.InferActionsRequest(frames=raw_frames(frames)), **self._kw())
        return list(response.actions)
