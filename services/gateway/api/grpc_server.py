"""The gRPC face of the gateway: genie.v1.Gateway over SessionService, plus health checking and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from genie_api.v1 import gateway_pb2 as pb
from genie_api.v1 import gateway_pb2_grpc as pb_grpc
from services.gateway.ratelog import RateLimitedLog
from services.gateway.security.auth import bearer
from services.gateway.sessions import GatewayError, Outcome, SessionService, encode_png
from services.gateway.stores.store import SessionRecord

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE = pb.DESCRIPTOR.services_by_name["Gateway"]
SERVICE_NAME = SERVICE.full_name  # genie.v1.Gateway
EXPECT_STEP_METADATA = "genie-expect-step"  # request metadata: step only a session at this step (idempotent retries)
STEP_RESPONSE_TRAILER = "genie-step-response-bin"  # a StepResponse committed but not confirmed durable
FRAME_FORMATS = frozenset(pb.FrameFormat.values())
MAX_RAW_DIM = 1 << 16  # any one of count, height, width, channels; the byte limit bounds their product


class Malformed:
    """What a request deserialises to when its bytes are not a valid message: the handler answers
    INVALID_ARGUMENT (grpc would answer UNKNOWN and log a traceback per request)."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.type_name, self.error = type_name, error


def _parser(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as exc:  # DecodeError, or RuntimeWarning-like errors from the C++ parser
            return Malformed(message_type.DESCRIPTOR.full_name, exc)

    return parse


def _frame(frame: np.ndarray, fmt: int) -> pb.Frame:
    h, w, c = frame.shape
    if fmt == pb.FRAME_FORMAT_RAW:
        return pb.Frame(height=h, width=w, channels=c, format=pb.FRAME_FORMAT_RAW, data=np.ascontiguousarray(frame).tobytes())
    return pb.Frame(height=h, width=w, channels=c, format=pb.FRAME_FORMAT_PNG, data=encode_png(frame))


def _raw(frames: pb.RawFrames) -> np.ndarray:
    """RawFrames as (count, H, W, C) uint8. Each dimension is bounded before the product is taken, and the
    product is a Python int (never a wrapping numpy int64), so no shape can pass the size check by overflow."""
    shape = (frames.count, frames.height, frames.width, frames.channels)
    if not all(1 <= d <= MAX_RAW_DIM for d in shape):
        raise GatewayError("INVALID_ARGUMENT", f"raw frames: every dimension of {shape} must be in 1..{MAX_RAW_DIM}")
    if math.prod(shape) != len(frames.data):
        raise GatewayError("INVALID_ARGUMENT", f"raw frames: {len(frames.data)} bytes do not make uint8 {shape}")
    return np.frombuffer(frames.data, dtype=np.uint8).reshape(shape)


def _expect_step(context: grpc.aio.ServicerContext) -> int | None:
    """The `genie-expect-step` request metadata: apply this Step only to the session at that step."""
    value = dict(context.invocation_metadata() or ()).get(EXPECT_STEP_METADATA)
    if value is None:
        return None
    if not (isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20):
        raise GatewayError("INVALID_ARGUMENT", f"{EXPECT_STEP_METADATA} must be a step number, got {value!r:.40}")
    return int(value)


def _format(fmt: int) -> int:
    """The requested frame format, checked before anything runs: an unknown one must fail before a step commits."""
    if fmt not in FRAME_FORMATS:
        raise GatewayError("INVALID_ARGUMENT", f"unknown frame_format {fmt}: expected one of {sorted(FRAME_FORMATS)}")
    return fmt


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
        world=record.world,
        world_digest=record.world_digest,
    )


class GatewayServicer(pb_grpc.GatewayServicer):
    def __init__(self, service: SessionService, log_period_s: float = 10.0) -> None:
        self.service = service
        self.ratelog = RateLimitedLog(log, log_period_s)  # one line per cause per period: garbage cannot flood the log

    async def _serve(self, method: str, request, context: grpc.aio.ServicerContext, fn: Callable[[str], Awaitable[T]]) -> T:
        """Authenticates, runs `fn(client)`, maps GatewayError to its status, and counts the outcome."""
        metrics = self.service.metrics
        metrics.in_flight.inc()
        code, message, trailers = "OK", "", ()
        try:
            if isinstance(request, Malformed):
                self.ratelog.log(f"malformed {method}", logging.WARNING, "%s: request bytes are not a valid %s: %s",
                                 method, request.type_name, request.error)
                raise GatewayError("INVALID_ARGUMENT", f"request bytes are not a valid {request.type_name}")
            token = bearer(dict(context.invocation_metadata() or ()).get("authorization"))
            return await fn(await self.service.authorize(token))
        except GatewayError as exc:
            code, message, trailers = exc.code, exc.message, exc.trailers
        except Exception as exc:  # a bug, not bad input: log it, tell the client no more than that
            self.ratelog.log(f"internal {method} {type(exc).__name__}", logging.ERROR, "%s failed", method, exc_info=True)
            code, message = "INTERNAL", f"internal error in {method}; see the gateway log"
        finally:
            metrics.in_flight.dec()
            metrics.record(method, code)
        if trailers:
            context.set_trailing_metadata(trailers)
        await context.abort(grpc.StatusCode[code], message)
        raise AssertionError("unreachable: abort raises")

    async def OpenSession(self, request: pb.OpenSessionRequest, context) -> pb.OpenSessionResponse:
        async def run(client: str) -> pb.OpenSessionResponse:
            fmt = _format(request.frame_format)
            which = request.WhichOneof("prompt")
            image = request.image if which == "image" else None
            frames = _raw(request.frames) if which == "frames" else None
            o = request.options
            outcome = await self.service.open(
                client, image=image, frames=frames, steps=o.steps,
                temperature=o.temperature if o.HasField("temperature") else None,
                seed=o.seed if o.HasField("seed") else None, world=request.world,
            )
            return pb.OpenSessionResponse(session=session_message(outcome.record), frame=_frame(outcome.frame, fmt))

        return await self._serve("OpenSession", request, context, run)

    async def Step(self, request: pb.StepRequest, context) -> pb.StepResponse:
        return await self._serve("Step", request, context, lambda client: self._step(client, request, _expect_step(context)))

    async def Play(self, request_iterator: AsyncIterator[pb.StepRequest], context) -> AsyncIterator[pb.StepResponse]:
        # The stream is authenticated and counted against the client's open streams when it opens, not at its
        # first message: a client cannot hold thousands of idle streams (UNAUTHENTICATED / RESOURCE_EXHAUSTED).
        slot = await self._serve("Play", None, context, self.service.open_stream)
        try:
            async for request in request_iterator:
                yield await self._serve("Play", request, context, lambda client, request=request: self._step(client, request))
        finally:
            slot.close()

    async def _step(self, client: str, request: pb.StepRequest, expect_step: int | None = None) -> pb.StepResponse:
        fmt = _format(request.frame_format)
        try:
            outcome = await self.service.step(client, request.session_id, request.action, expect_step)
        except GatewayError as exc:
            if exc.outcome is not None:  # committed but not confirmed durable: the response rides in the trailers
                exc.trailers = (*exc.trailers, (STEP_RESPONSE_TRAILER, self._step_response(exc.outcome, fmt).SerializeToString()))
            raise
        return self._step_response(outcome, fmt)

    @staticmethod
    def _step_response(outcome: Outcome, fmt: int) -> pb.StepResponse:
        return pb.StepResponse(session_id=outcome.record.session_id, step=outcome.record.state.step,
                               frame=_frame(outcome.frame, fmt), action=outcome.action)

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.Session:
        async def run(client: str) -> pb.Session:
            return session_message(await self.service.get(client, request.session_id))

        return await self._serve("GetSession", request, context, run)

    async def CloseSession(self, request: pb.CloseSessionRequest, context) -> pb.CloseSessionResponse:
        async def run(client: str) -> pb.CloseSessionResponse:
            await self.service.close(client, request.session_id)
            return pb.CloseSessionResponse()

        return await self._serve("CloseSession", request, context, run)

    async def ListActions(self, request: pb.ListActionsRequest, context) -> pb.ListActionsResponse:
        async def run(client: str) -> pb.ListActionsResponse:
            if request.session_id and request.world:
                raise GatewayError("INVALID_ARGUMENT", "give a world or a session_id, not both")
            if request.session_id:
                spec = await self.service.session_world(client, request.session_id)
            else:
                spec = await self.service.world(request.world)
            actions = [pb.Action(id=i, name=spec.action_name(i)) for i in range(spec.num_actions)]
            keys = [pb.KeyBinding(key=b.key, action=b.action, share=b.share) for b in spec.key_bindings()]  # None: unset
            return pb.ListActionsResponse(actions=actions, height=spec.height, width=spec.width, channels=spec.channels,
                                          window=spec.window, keys=keys)

        return await self._serve("ListActions", request, context, run)

    async def InferActions(self, request: pb.InferActionsRequest, context) -> pb.InferActionsResponse:
        async def run(client: str) -> pb.InferActionsResponse:
            frames = _raw(request.frames)
            return pb.InferActionsResponse(actions=(await self.service.infer_actions(frames, request.world)).tolist())

        return await self._serve("InferActions", request, context, run)

    async def ListWorlds(self, request: pb.ListWorldsRequest, context) -> pb.ListWorldsResponse:
        async def run(client: str) -> pb.ListWorldsResponse:
            worlds = [pb.WorldInfo(name=e.name, version=e.version, ref=e.ref, digest=e.digest, retired=e.retired,
                                   published_unix=e.published_at) for e in self.service.list_worlds()]
            return pb.ListWorldsResponse(worlds=worlds, default_world=self.service.worlds.default,
                                         catalogue=self.service.worlds.catalog is not None)

        return await self._serve("ListWorlds", request, context, run)


def _handlers(servicer: GatewayServicer) -> grpc.GenericRpcHandler:
    """The Gateway's method handlers, as the generated add_GatewayServicer_to_server builds them, but with
    parsers that turn undecodable bytes into Malformed instead of raising inside grpc."""
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler}
    handlers = {}
    for method in SERVICE.methods:
        make = kinds[(method.client_streaming, method.server_streaming)]
        parse = _parser(getattr(pb, method.input_type.name))
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=parse,
                                     response_serializer=lambda m: m.SerializeToString())
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class GrpcServer:
    """grpc.aio server with the Gateway service, standard health checking (tracks backend + store) and reflection."""

    def __init__(self, service: SessionService, host: str = "127.0.0.1", port: int = 0, health_period_s: float = 2.0,
                 credentials: grpc.ServerCredentials | None = None, plaintext_port: int | None = None) -> None:
        """With `credentials`, `port` is a TLS port and there is no plaintext one unless `plaintext_port` asks
        for it (0 = a free port); health checking and reflection answer on every port."""
        self.service, self.health_period_s = service, health_period_s
        margin = 64 << 10  # protobuf framing around the prompt bytes
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", service.limits.max_prompt_bytes + margin),
            ("grpc.max_send_message_length", 64 << 20),
        ])
        self.server.add_generic_rpc_handlers((_handlers(GatewayServicer(service)),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        if credentials is None:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        else:
            self.port = self.server.add_secure_port(f"{host}:{port}", credentials)
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC port {host}:{port}")
        self.address = f"{host}:{self.port}"
        self.tls = credentials is not None
        self.plaintext_address: str | None = None  # the opt-in plaintext port beside a TLS one
        if credentials is not None and plaintext_port is not None:
            bound = self.server.add_insecure_port(f"{host}:{plaintext_port}")
            if bound == 0:
                raise OSError(f"cannot bind the plaintext gRPC port {host}:{plaintext_port}")
            self.plaintext_address = f"{host}:{bound}"
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
