"""The gateway's core: play sessions over a ModelBackend and a SessionStore, with auth, limits and errors.

Transport-neutral: the gRPC server (grpc_server.py) and the web page's JSON API (web.py) are thin adapters
over SessionService. Every failure is a GatewayError whose `code` names the gRPC status to return; a failed
call changes no session.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import random
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from genie.catalog import WorldVersion
from genie.media import load_image
from genie.sampling import SamplingConfig, advance, new_state
from genie.spec import WorldSpec
from services.backends.admission import Overloaded, step_deadline
from services.backends.backend import BackendError, BackendUnavailable, ModelBackend
from services.backends.worlds import SINGLE, ModelsBudgetExceeded, ServedWorlds, WorldNotFound
from services.gateway.metrics import GatewayMetrics
from services.gateway.ratelog import RateLimitedLog
from services.gateway.security.auth import Authenticator
from services.gateway.stores.store import LimitExceeded, NotReplicated, SessionRecord, SessionStore, StoreUnavailable

COMMITTED_VERSION_TRAILER = "genie-committed-version"  # on UNAVAILABLE: the step did commit, as this version
PROMPT_FORMATS = ("PNG", "JPEG")
REFUSAL_MEMORY_S = 10.0  # health names the store's last refusal this long, unless a write succeeds first
log = logging.getLogger(__name__)


class GatewayError(Exception):
    """A failed call: `code` is a gRPC status code name (NOT_FOUND, INVALID_ARGUMENT, ...)."""

    def __init__(self, code: str, message: str, trailers: tuple[tuple[str, str | bytes], ...] = (),
                 outcome: Outcome | None = None) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.trailers = trailers  # extra gRPC trailing metadata
        self.outcome = outcome  # a step that committed although the call failed (see NotReplicated in step())


@dataclass(frozen=True)
class Limits:
    session_ttl_s: float = 600.0  # idle sessions expire; every step refreshes
    max_sessions_per_client: int = 16
    max_prompt_bytes: int = 4 << 20  # encoded image or raw frames
    max_prompt_pixels: int = 4096 * 4096  # before decoding: guards against decompression bombs
    requests_per_second: int = 100  # per client, all calls
    max_sampling_steps: int = 64
    max_temperature: float = 10.0
    commit_retries: int = 8  # optimistic-concurrency retries when another replica stepped the session first
    step_deadline_s: float = 0.0  # a step not admitted to the models this long after it arrived: UNAVAILABLE (0 = none)
    max_streams_per_client: int = 16  # open Play streams per client on one gateway: idle ones cost memory, not steps

    def __post_init__(self) -> None:
        if self.session_ttl_s <= 0 or self.max_sessions_per_client < 1 or self.requests_per_second < 1:
            raise ValueError("ttl, max sessions and rate limit must be positive")
        if self.max_streams_per_client < 1:
            raise ValueError(f"max_streams_per_client must be >= 1, got {self.max_streams_per_client}")
        if self.step_deadline_s < 0:
            raise ValueError(f"step_deadline_s must be >= 0, got {self.step_deadline_s}")


@dataclass(frozen=True)
class Outcome:
    """A session after a call, with the frame to show: (H, W, C) uint8."""

    record: SessionRecord
    frame: np.ndarray
    action: int = -1
    action_name: str = ""  # the action's name in the session's world


class SessionService:
    """`backend`: the one world's ModelBackend, or the ServedWorlds of a catalogue (sessions choose a world)."""

    def __init__(self, backend: ModelBackend | ServedWorlds, store: SessionStore, auth: Authenticator,
                 limits: Limits | None = None, metrics: GatewayMetrics | None = None) -> None:
        self.worlds = backend if isinstance(backend, ServedWorlds) else ServedWorlds(single=backend)
        self.backend = self.worlds.single  # None when serving a catalogue
        self.store, self.auth = store, auth
        self.limits = limits or Limits()
        self.metrics = metrics or GatewayMetrics()
        self.ratelog = RateLimitedLog(log)  # one line per refusal cause per period, however many calls it refuses
        self._refusal: tuple[str, str, float] | None = None  # the store's last refusal: (cause, message, monotonic s)
        self._streams: dict[str, int] = {}  # client -> Play streams open on this gateway
        # session -> [lock, waiters]: steps of one session on this gateway run one after another, in arrival order, so a
        # client may send the next step before the last one's reply (a page holding a key) without the two computing
        # the same frame and one of them retrying. Replicas still serialise through the store's versioned commit.
        self._stepping: dict[str, list] = {}

    @property
    def spec(self) -> WorldSpec:
        """The one world's spec, valid once world() has succeeded (a catalogue's worlds: `await world(name)`)."""
        if self.backend is None:
            raise RuntimeError("this gateway serves a catalogue: ask world(name) for a world's spec")
        return self.backend.spec

    async def world(self, world: str = "") -> WorldSpec:
        """The spec of a world a new session would get ("" = the default; "name" or "name@version" in a catalogue),
        starting its backend if needed: a gateway may come up before its model services and answers UNAVAILABLE
        (health NOT_SERVING) until they are there."""
        async with self._world(_ref(self.resolve_world(world))) as backend:
            return backend.spec

    async def session_world(self, client: str, session_id: str) -> WorldSpec:
        """The spec of the world a session is pinned to."""
        record = await self._owned(client, session_id)
        async with self._world(record.world) as backend:
            return backend.spec

    def list_worlds(self) -> list:
        """The catalogue's versions (WorldVersion), oldest first; empty for a gateway that serves one world."""
        return self.worlds.versions()

    def resolve_world(self, world: str) -> WorldVersion | None:
        """The catalogue version a new session on `world` gets; None for the one world of a gateway without a
        catalogue. NOT_FOUND / FAILED_PRECONDITION (retired) / INVALID_ARGUMENT (a malformed name)."""
        try:
            return self.worlds.resolve(world)
        except WorldNotFound as exc:
            raise GatewayError("FAILED_PRECONDITION" if exc.retired else "NOT_FOUND", str(exc)) from exc
        except ValueError as exc:
            raise GatewayError("INVALID_ARGUMENT", str(exc)) from exc

    @contextlib.asynccontextmanager
    async def _world(self, ref: str):
        """The started backend of a pinned world version, kept loaded for the block."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                backend = await self._model(stack.enter_async_context(self.worlds.use(ref)))
            except WorldNotFound as exc:
                raise GatewayError("FAILED_PRECONDITION", f"the session's world {ref} cannot be loaded: {exc}") from exc
            except ModelsBudgetExceeded as exc:
                raise GatewayError("RESOURCE_EXHAUSTED", str(exc)) from exc
            yield backend

    async def authorize(self, token: str | None) -> str:
        """The client id of a token, after the rate limit; raises UNAUTHENTICATED / RESOURCE_EXHAUSTED."""
        client = self.auth.client_of(token)
        if client is None:
            raise GatewayError("UNAUTHENTICATED", "missing or unknown API token (send 'authorization: Bearer <token>')")
        if not await self._store(self.store.allow(client, self.limits.requests_per_second)):
            raise GatewayError("RESOURCE_EXHAUSTED", f"rate limit: at most {self.limits.requests_per_second} requests/s per client")
        return client

    async def open_stream(self, client: str) -> StreamSlot:
        """A slot for one Play stream of `client`, held while the stream is open (StreamSlot.close gives it back);
        RESOURCE_EXHAUSTED when the client already holds Limits.max_streams_per_client. A stream is checked when it
        opens, before any message, so idle streams cannot pile up."""
        held = self._streams.get(client, 0)
        if held >= self.limits.max_streams_per_client:
            raise GatewayError("RESOURCE_EXHAUSTED", f"at most {self.limits.max_streams_per_client} open Play streams per "
                                                     f"client on one gateway; close one, or use Step")
        self._streams[client] = held + 1
        self.metrics.play_streams.inc()
        return StreamSlot(self, client)

    def _close_stream(self, client: str) -> None:
        held = self._streams.get(client, 0) - 1
        if held > 0:
            self._streams[client] = held
        else:
            self._streams.pop(client, None)
        self.metrics.play_streams.dec()

    async def open(self, client: str, image: bytes | None = None, frames: np.ndarray | None = None, steps: int = 0,
                   temperature: float | None = None, seed: int | None = None, world: str = "") -> Outcome:
        """Starts a session from an encoded image or raw frames (t, H, W, C) uint8, on `world` ("" = the default;
        "name" = its newest live version; "name@version"), to which the session stays pinned."""
        entry = self.resolve_world(world)
        async with self._world(_ref(entry)) as backend:
            return await self._open(client, backend, _ref(entry), entry.digest if entry else "", image, frames, steps,
                                    temperature, seed)

    async def _open(self, client: str, backend: ModelBackend, ref: str, digest: str, image: bytes | None,
                    frames: np.ndarray | None, steps: int, temperature: float | None, seed: int | None) -> Outcome:
        spec = backend.spec
        prompt = self._prompt(spec, image, frames)
        sampling = self._sampling(spec, steps, temperature)
        if seed is None:
            seed = random.SystemRandom().randrange(1 << 62)
        elif not 0 <= seed < 1 << 63:
            raise GatewayError("INVALID_ARGUMENT", f"seed must be in [0, 2^63), got {seed}")
        if await self._store(self.store.count(client)) >= self.limits.max_sessions_per_client:
            raise GatewayError("RESOURCE_EXHAUSTED", f"at most {self.limits.max_sessions_per_client} open sessions per client")
        async with self._admit(backend):
            tokens = await self._model(backend.encode(prompt))
            state = new_state(uuid.uuid4().hex, torch.from_numpy(tokens), seed)
            frame = await self._model(backend.decode_last(state))
        now = time.time()
        record = SessionRecord(state.session_id, client, state, sampling, now, now + self.limits.session_ttl_s, ref, digest)
        try:
            await self._store(self.store.create(record, self.limits.max_sessions_per_client), write=True)
        except LimitExceeded as exc:
            raise GatewayError("RESOURCE_EXHAUSTED", str(exc)) from exc
        except NotReplicated as exc:  # nobody saw this session yet: drop it, and a retry opens a fresh one
            with contextlib.suppress(Exception):
                await self.store.delete(record.session_id)
            raise GatewayError("UNAVAILABLE", f"session store could not confirm the new session: {exc}; retry") from exc
        self.metrics.sessions_opened.inc()
        return Outcome(record, frame)

    async def step(self, client: str, session_id: str, action: int, expect_step: int | None = None) -> Outcome:
        """Advances a session by one frame; retried on a concurrent commit, so steps are applied one at a time.

        With `expect_step`, the step applies only to the session at that step (else ABORTED): a client retrying
        a step whose first attempt may still be running elsewhere cannot have both applied.
        """
        if self.worlds.catalog is None:  # one world: a bad action is refused before the session is read
            spec = await self.world()
            if not 0 <= action < spec.num_actions:
                raise GatewayError("INVALID_ARGUMENT", f"unknown action {action}: this world has actions "
                                                       f"0..{spec.num_actions - 1}")
        elif action < 0:
            raise GatewayError("INVALID_ARGUMENT", f"unknown action {action}: actions are numbered from 0")
        with step_deadline(self.limits.step_deadline_s):
            async with self._one_step_at_a_time(session_id):
                return await self._step(client, session_id, action, expect_step)

    @contextlib.asynccontextmanager
    async def _one_step_at_a_time(self, session_id: str):
        entry = self._stepping.setdefault(session_id, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._stepping[session_id]

    async def _step(self, client: str, session_id: str, action: int, expect_step: int | None) -> Outcome:
        started = time.perf_counter()
        for _ in range(self.limits.commit_retries):
            t0 = time.perf_counter()
            record = await self._owned(client, session_id)
            if expect_step is not None and record.state.step != expect_step:
                raise GatewayError("ABORTED", f"session {session_id} is at step {record.state.step}, not the expected "
                                              f"{expect_step}: it moved on (an earlier attempt of this step may have landed)")
            async with self._world(record.world) as backend, self._admit(backend):
                spec = backend.spec
                if action >= spec.num_actions:
                    raise GatewayError("INVALID_ARGUMENT", f"unknown action {action}: this world has actions "
                                                           f"0..{spec.num_actions - 1}")
                t1 = time.perf_counter()
                tokens = await self._model(backend.next_tokens(record.state, action, record.sampling))
                new = advance(record.state, torch.from_numpy(tokens), action, spec.window, spec.keep)
                frame = await self._model(backend.decode_last(new))
            updated = record.advanced(new, time.time(), self.limits.session_ttl_s)
            t2 = time.perf_counter()
            try:
                committed = await self._store(self.store.commit(updated, record.version), write=True)
            except NotReplicated as exc:
                # The step is on the primary but not confirmed on a replica: acknowledging it could show the
                # client a frame a failover then loses; a plain retryable error would make a retry step twice.
                # So: UNAVAILABLE, naming the version it committed as (and carrying the response). GetSession
                # tells the client whether it survived (version >= that one) before it retries.
                self.metrics.steps.inc()
                raise GatewayError(
                    "UNAVAILABLE", f"step committed as version {exc.version} but not confirmed durable ({exc}); "
                    f"GetSession: if the version is >= {exc.version} the step holds, else retry it",
                    trailers=((COMMITTED_VERSION_TRAILER, str(exc.version)),),
                    outcome=Outcome(updated, frame, action, spec.action_name(action)),
                ) from exc
            t3 = time.perf_counter()
            self.metrics.model_seconds.observe(t2 - t1)
            self.metrics.store_seconds.observe((t1 - t0) + (t3 - t2))
            if committed:
                self.metrics.steps.inc()
                self.metrics.step_seconds.observe(t3 - started)
                return Outcome(updated, frame, action, spec.action_name(action))
            self.metrics.commit_conflicts.inc()
            await asyncio.sleep(random.uniform(0, 0.01))  # let the other replica's commit land
        raise GatewayError("ABORTED", f"session {session_id} is being stepped concurrently; retry")

    async def get(self, client: str, session_id: str) -> SessionRecord:
        return await self._owned(client, session_id)

    async def close(self, client: str, session_id: str) -> None:
        await self._owned(client, session_id)
        if not await self._store(self.store.delete(session_id)):
            raise GatewayError("NOT_FOUND", f"no session {session_id}")
        self.metrics.sessions_closed.inc()

    async def infer_actions(self, frames: np.ndarray, world: str = "") -> np.ndarray:
        """The latent actions between consecutive frames, by the LAM of `world` (as for open)."""
        async with self._world(_ref(self.resolve_world(world))) as backend:
            if frames.nbytes > self.limits.max_prompt_bytes:
                raise GatewayError("INVALID_ARGUMENT",
                                   f"clip is {frames.nbytes} bytes, the limit is {self.limits.max_prompt_bytes}")
            self._check_raw(frames, backend.spec)
            return await self._model(backend.infer_actions(frames))

    async def ready(self) -> bool:
        try:
            return await self.worlds.ready() and await self.store.ping()
        except Exception:
            return False

    def store_refusal(self) -> tuple[str, str] | None:
        """(cause, message) of the store's refusal of a call in the last REFUSAL_MEMORY_S seconds when no write has
        succeeded since ("full", "persistence", "readonly", "unreachable"), else None: what health reports. A full
        store keeps the gateway ready: reads and closes still work there, and closing sessions is what frees it."""
        if self._refusal is None or time.monotonic() - self._refusal[2] > REFUSAL_MEMORY_S:
            return None
        return self._refusal[:2]

    # --- helpers -------------------------------------------------------------------------------------------

    async def _owned(self, client: str, session_id: str) -> SessionRecord:
        if not session_id or len(session_id) > 64:
            raise GatewayError("INVALID_ARGUMENT", "session_id must be 1..64 characters")
        record = await self._store(self.store.get(session_id))
        if record is None or record.owner != client:  # another client's session is indistinguishable from none
            raise GatewayError("NOT_FOUND", f"no session {session_id} (closed, expired, or never opened by this client)")
        return record

    def _prompt(self, spec: WorldSpec, image: bytes | None, frames: np.ndarray | None) -> np.ndarray:
        if (image is None) == (frames is None):
            raise GatewayError("INVALID_ARGUMENT", "give exactly one prompt: an image or raw frames")
        if image is not None:
            if not image:
                raise GatewayError("INVALID_ARGUMENT", "the prompt image is empty")
            if len(image) > self.limits.max_prompt_bytes:
                raise GatewayError("INVALID_ARGUMENT", f"prompt image is {len(image)} bytes, over {self.limits.max_prompt_bytes}")
            try:
                with Image.open(io.BytesIO(image), formats=PROMPT_FORMATS) as im:  # the header only: size before pixels
                    w, h = im.size
            except Exception as exc:  # a decoder fed untrusted bytes may raise anything (SyntaxError, struct.error...)
                raise GatewayError("INVALID_ARGUMENT", f"cannot read the prompt image (PNG or JPEG expected): {exc}") from exc
            if min(w, h) < 1 or w * h > self.limits.max_prompt_pixels:
                raise GatewayError("INVALID_ARGUMENT", f"prompt image is {w}x{h}: need 1 to {self.limits.max_prompt_pixels} pixels")
            try:
                return load_image(image, spec.height, spec.width)[None]  # (1, H, W, C)
            except Exception as exc:  # corrupt pixel data behind a valid header, truncated streams, odd modes
                raise GatewayError("INVALID_ARGUMENT", f"cannot decode the prompt image: {exc}") from exc
        assert frames is not None
        if frames.nbytes > self.limits.max_prompt_bytes:
            raise GatewayError("INVALID_ARGUMENT", f"prompt frames are {frames.nbytes} bytes, over {self.limits.max_prompt_bytes}")
        self._check_raw(frames, spec, max_frames=spec.window)
        return frames

    @staticmethod
    def _check_raw(frames: np.ndarray, spec: WorldSpec, max_frames: int | None = None) -> None:
        want = (spec.height, spec.width, spec.channels)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != want:
            raise GatewayError("INVALID_ARGUMENT", f"raw frames must be uint8 (count, {want[0]}, {want[1]}, {want[2]}), "
                                                   f"got {frames.dtype} {tuple(frames.shape)}")
        if frames.shape[0] < 1 or (max_frames is not None and frames.shape[0] > max_frames):
            raise GatewayError("INVALID_ARGUMENT", f"need 1 to {max_frames} frames, got {frames.shape[0]}")

    def _sampling(self, spec: WorldSpec, steps: int, temperature: float | None) -> SamplingConfig:
        default = spec.sampling
        if steps < 0 or steps > self.limits.max_sampling_steps:
            raise GatewayError("INVALID_ARGUMENT", f"sampling steps must be in 1..{self.limits.max_sampling_steps} (0 = default)")
        if temperature is not None and not 0 <= temperature <= self.limits.max_temperature:
            raise GatewayError("INVALID_ARGUMENT", f"temperature must be in [0, {self.limits.max_temperature}]")
        # The world's own sampling with the client's two choices over it: every other field (guidance, schedule, ...)
        # stays the world's.
        return dataclasses.replace(default, steps=steps or default.steps,
                                   temperature=default.temperature if temperature is None else temperature)

    @contextlib.asynccontextmanager
    async def _admit(self, backend: ModelBackend):
        """One admission for a whole operation when the backend sheds load (AdmissionBackend), else nothing."""
        admit = getattr(backend, "admit", None)
        if admit is None:
            yield
            return
        try:
            async with admit():
                yield
        except Overloaded as exc:
            raise GatewayError(exc.code, f"overloaded: {exc}") from exc

    async def _store(self, op, write: bool = False):
        """Awaits a store call; a refusal becomes its status (RESOURCE_EXHAUSTED when full, else UNAVAILABLE), is
        counted by cause, logged once per cause per period, and remembered for health until a write succeeds."""
        try:
            result = await op
        except StoreUnavailable as exc:
            self.metrics.store_refusals.labels(exc.cause).inc()
            self._refusal = (exc.cause, str(exc), time.monotonic())
            self.ratelog.log(f"store {exc.cause}", logging.WARNING, "session store refused a call (%s): %s", exc.cause, exc)
            raise GatewayError(exc.code, str(exc)) from exc
        if write:
            self._refusal = None
        return result

    @staticmethod
    async def _model(op):
        try:
            return await op
        except Overloaded as exc:
            raise GatewayError(exc.code, f"overloaded: {exc}") from exc
        except BackendUnavailable as exc:
            raise GatewayError("UNAVAILABLE", f"model service unavailable: {exc}") from exc
        except ValueError as exc:
            raise GatewayError("INVALID_ARGUMENT", str(exc)) from exc
        except BackendError as exc:
            raise GatewayError("INTERNAL", f"model service failed: {exc}") from exc


def _ref(entry: WorldVersion | None) -> str:
    """The ref a session pins: the version's "name@version", or "" for the one world of a gateway."""
    return SINGLE if entry is None else entry.ref


class StreamSlot:
    """One open Play stream of a client (SessionService.open_stream); close() gives it back, once."""

    def __init__(self, service: SessionService, client: str) -> None:
        self._service, self.client, self._open = service, client, True

    def close(self) -> None:
        if self._open:
            self._open = False
            self._service._close_stream(self.client)


def encode_png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", compress_level=1)  # fast: frames are small, latency matters
    return buf.getvalue()
