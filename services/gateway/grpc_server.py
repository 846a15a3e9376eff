"""The gRPC face of the gateway: genie.v1.Gateway over SessionService, plus health checking and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from genie_api.v1 import gateway_pb2 as pb
from genie_api.v1 import gateway_pb2_grpc as pb_grpc
from services.gateway.auth import bearer
from services.gateway.sessions import GatewayError, Outcome, SessionService, encode_png
from services.gateway.store import SessionRecord

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Gateway"].full_name  # genie.v1.Gateway


def _frame(frame: np.ndarray, fmt: int) -> pb.Frame:
    h, w, c = frame.shape
    if fmt == pb.FRAME_FORMAT_RAW:
        return pb.Frame(height=h, width=w, channels=c, format=pb.FRAME_FORMAT_RAW, data=np.ascontiguousarray(frame).tobytes())
    return pb.Frame(height=h, width=w, channels=c, format=pb.FRAME_FORMAT_PNG, data=encode_png(frame))


def _raw(frames: pb.RawFrames) -> np.ndarray:
    shape = (frames.count, frames.height, frames.width, frames.channels)
    if int(np.prod(shape)) != len(frames.data) or frames.count == 0:
        raise GatewayError("INVALID_ARGUMENT", f"raw frames: {len(frames.data)} bytes do not make uint8 {shape}")
    return np.frombuffer(frames.data, dtype=np.uint8).reshape(shape)


def session_message(record: SessionRecord) -> pb.Session:
    s = record.sampling
    return pb.Session(
        session_id=record.session_id,
        step=record.state.step,
        version=record.version,
        context_frames=record.state.tokens.shape[0],
        actions=record.state.actions.tolist(),
        options=pb.SamplingOptions(steps=s.steps, temperature=s.temperature, seed=record.state.seed),
        created_unix=record.created,
        expires_unix=record.expires,
    )


class GatewayServicer(pb_grpc.GatewayServicer):
    def __init__(self, service: SessionService) -> None:
        self.service = service

    async def _serve(self, method: str, context: grpc.aio.ServicerContext, fn: Callable[[str], Awaitable[T]]) -> T:
        """Authenticates, runs `fn(client)`, maps GatewayError to its status, and counts the outcome."""
        metrics = self.service.metrics
        metrics.in_flight.inc()
        code, message = "OK", ""
        try:
            token = bearer(dict(context.invocation_metadata() or ()).get("authorization"))
            return await fn(await self.service.authorize(token))
        except GatewayError as exc:
            code, message = exc.code, exc.message
        except Exception:  # a bug, not bad input: log it, tell the client no more than that
            log.exception("%s failed", method)
            code, message = "INTERNAL", f"internal error in {method}; see the gateway log"
        finally:
            metrics.in_flight.dec()
            metrics.record(method, code)
        await context.abort(grpc.StatusCode[code], message)
        raise AssertionError("unreachable: abort raises")

    async def OpenSession(self, request: pb.OpenSessionRequest, context) -> pb.OpenSessionResponse:
        async def run(client: str) -> pb.OpenSessionResponse:
            which = request.WhichOneof("prompt")
            image = request.image if which == "image" else None
            frames = _raw(request.frames) if which == "frames" else None
            o = request.options
            outcome = await self.service.open(
                client, image=image, frames=frames, steps=o.steps,
                temperature=o.temperature if o.HasField("temperature") else None,
                seed=o.seed if o.HasField("seed") else None,
            )
            frame = _frame(outcome.frame, request.frame_format)
            return pb.OpenSessionResponse(session=session_message(outcome.record), frame=frame)

        return await self._serve("OpenSession", context, run)

    async def Step(self, request: pb.StepRequest, context) -> pb.StepResponse:
        async def run(client: str) -> pb.StepResponse:
            return self._step_response(await self.service.step(client, request.session_id, request.action), request.frame_format)

        return await self._serve("Step", context, run)

    async def Play(self, request_iterator: AsyncIterator[pb.StepRequest], context) -> AsyncIterator[pb.StepResponse]:
        async for request in request_iterator:
            async def run(client: str, request=request) -> pb.StepResponse:
                outcome = await self.service.step(client, request.session_id, request.action)
                return self._step_response(outcome, request.frame_format)

            yield await self._serve("Play", context, run)

    @staticmethod
    def _step_response(outcome: Outcome, fmt: int) -> pb.StepResponse:
        return pb.StepResponse(session_id=outcome.record.session_id, step=outcome.record.state.step,
                               frame=_frame(outcome.frame, fmt), action=outcome.action)

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.Session:
        async def run(client: str) -> pb.Session:
            return session_message(await self.service.get(client, request.session_id))

        return await self._serve("GetSession", context, run)

    async def CloseSession(self, request: pb.CloseSessionRequest, context) -> pb.CloseSessionResponse:
        async def run(client: str) -> pb.CloseSessionResponse:
            await self.service.close(client, request.session_id)
            return pb.CloseSessionResponse()

        return await self._serve("CloseSession", context, run)

    async def ListActions(self, request: pb.ListActionsRequest, context) -> pb.ListActionsResponse:
        async def run(client: str) -> pb.ListActionsResponse:
            spec = await self.service.world()
            actions = [pb.Action(id=i, name=spec.action_name(i)) for i in range(spec.num_actions)]
            keys = [pb.KeyBinding(key=b.key, action=b.action, share=b.share) for b in spec.key_bindings()]  # None: unset
            return pb.ListActionsResponse(actions=actions, height=spec.height, width=spec.width, channels=spec.channels,
                                          window=spec.window, keys=keys)

        return await self._serve("ListActions", context, run)

    async def InferActions(self, request: pb.InferActionsRequest, context) -> pb.InferActionsResponse:
        async def run(client: str) -> pb.InferActionsResponse:
            return pb.InferActionsResponse(actions=(await self.service.infer_actions(_raw(request.frames))).tolist())

        return await self._serve("InferActions", context, run)


class GrpcServer:
    """grpc.aio server with the Gateway service, standard health checking (tracks backend + store) and reflection."""

    def __init__(self, service: SessionService, host: str = "127.0.0.1", port: int = 0, health_period_s: float = 2.0) -> None:
        self.service, self.health_period_s = service, health_period_s
        margin = 64 << 10  # protobuf framing around the prompt bytes
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", service.limits.max_prompt_bytes + margin),
            ("grpc.max_send_message_length", 64 << 20),
        ])
        pb_grpc.add_GatewayServicer_to_server(GatewayServicer(service), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC port {host}:{port}")
        self.address = f"{host}:{self.port}"
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        await self.server.start()
        await self._update_health()
        self._watch = asyncio.create_task(self._watch_health())

    async def _update_health(self) -> None:
        ok = await self.service.ready()
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.health_period_s)
            with contextlib.suppress(Exception):
                await self._update_health()

    async def stop(self, grace_s: float = 2.0) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
