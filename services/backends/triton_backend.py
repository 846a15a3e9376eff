"""The remote model backend: the world's models behind NVIDIA Triton (services/{tokenizer,lam,dynamics}), over gRPC.

Same contract as InProcessBackend (services/backends/backend.py). Each call is one Triton request; Triton's
dynamic batcher batches concurrent calls across sessions. Windows are padded to fixed shapes
(services/triton/protocol.py) so that concurrent requests are equal in shape and can batch.

Errors: input is validated here exactly as InProcessBackend does (ValueError, never sent); UNAVAILABLE is
retried with backoff, then it, a timeout or a missing model becomes BackendUnavailable; Triton's INVALID_ARG
becomes ValueError; anything else BackendError. While Triton is down the gRPC channel keeps reconnecting, at most
`reconnect_s` apart (gRPC's default backoff grows to 2 minutes), and a call's retries span longer than that, so the
first call after Triton is back succeeds: a gateway recovers by itself, without a restart.

Replicas (services/backends/routing.py): each model may have several endpoints ("a:8001,b:8001", or
"dns:svc:8001" for every pod behind a headless Service). Calls of one session (next_tokens, decode_last) go to
its rendezvous-hash home among the healthy endpoints, so its K/V cache hits; encode and infer_actions spread over
all. An endpoint that answers UNAVAILABLE, times out or lacks the model is marked down and the call moves on to the
next endpoint in the session's rank order (a failover: that replica recomputes the session from its tokens, so the
frames are identical). Only when every endpoint failed do the retries above apply.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from prometheus_client import CollectorRegistry, Counter
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from genie.sampling import SamplingConfig
from genie.spec import WorldSpec
from genie.state import WorldState
from services.backends.backend import (
    BackendCredentialsRejected,
    BackendError,
    BackendUnavailable,
    check_frames,
    check_state,
)
from services.backends.routing import EndpointSet, HealthPolicy, parse_endpoints
from services.backends.triton_catalogue import VersionModels
from services.tls_files import check_client_files, files_digest
from services.tls_probe import certificate_problem
from services.triton import protocol as P

log = logging.getLogger(__name__)
T = TypeVar("T")

# grpc status names as tritonclient reports them (str(grpc.StatusCode.X))
_UNAVAILABLE, _DEADLINE, _NOT_FOUND, _INVALID = (
    "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT")


_FAILOVER = (_UNAVAILABLE, _DEADLINE, _NOT_FOUND)  # the endpoint, not the request, is at fault: try another


class RoutingMetrics:
    """Prometheus counters of the routing: calls answered per model and endpoint, and failovers away from one."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.calls = Counter("genie_triton_routed_calls", "Inferences answered, by model and endpoint",
                             ["model", "endpoint"], registry=self.registry)
        self.failovers = Counter("genie_triton_failovers", "Calls moved on from a failing endpoint, by model and endpoint",
                                 ["model", "endpoint"], registry=self.registry)

    def value(self, counter: str, model: str, endpoint: str) -> float:
        """A counter's current value (0 if never incremented), e.g. value("calls", "dynamics", "host:port")."""
        name = {"calls": "genie_triton_routed_calls_total", "failovers": "genie_triton_failovers_total"}[counter]
        return self.registry.get_sample_value(name, {"model": model, "endpoint": endpoint}) or 0.0


@dataclass(frozen=True)
class TritonClientTLS:
    """TLS from the gateway to Triton's gRPC endpoints: `ca` (PEM) verifies the servers (empty = the system's
    CAs); `cert` + `key` are the gateway's own certificate for a server that requires one (mutual TLS)."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    def __post_init__(self) -> None:
        check_client_files("Triton", ("--triton-ca", self.ca), ("--triton-cert", self.cert), ("--triton-key", self.key))

    def client_kwargs(self) -> dict:
        """tritonclient's aio InferenceServerClient ssl arguments (it takes the file paths and reads them)."""
        return {"ssl": True, "root_certificates": self.ca or None, "private_key": self.key or None,
                "certificate_chain": self.cert or None}

    def certificate_problem(self, url: str) -> str | None:
        """Why TLS to `url` (host:port) fails on certificates with these files, or None (services/tls_probe.py)."""
        host, _, port = url.rpartition(":")
        return certificate_problem(host.strip("[]"), int(port), self.ca, self.cert, self.key)

    def digest(self) -> bytes | None:
        """A hash of the files' contents, to notice a renewal; None while one cannot be read (being replaced)."""
        return files_digest(self.ca, self.cert, self.key)


class TritonBackend:
    """Talks to the Triton servers holding the `tokenizer`, `lam` and `dynamics` models of one world.

    Args:
        url: the servers' gRPC addresses: "host:port", several comma-separated, or "dns:name:port" (all A records).
        timeout_s: deadline of each attempt of each call.
        retries: extra attempts after an UNAVAILABLE answer, spaced by `backoff_s` doubling each time
            (defaults: 0.35 s in all, so a server that is down fails a call quickly).
        reconnect_s: the longest the channel waits between reconnection attempts while the server is down;
            keep it below the retries' span.
        model_urls: per-model endpoints in the same forms as `url` (a Deployment per model, as the Helm chart runs).
        health: how long a failed endpoint is skipped, and how often DNS names are looked up again.
        registry: where the routing counters go (the gateway passes its metrics registry).
        tls: TLS to the servers (a server with --grpc-use-ssl); None = plaintext.
        tls_check_s: how often the TLS files are re-read; when they changed (a renewed client certificate or CA),
            calls from then on connect with the new ones, and the old connections close once the calls that may
            still run on them are past their deadline. No restart needed when cert-manager renews a mounted Secret.
        models: a catalogue version's models (services/backends/triton_catalogue.py) on a Triton with explicit model
            control: start() loads them where they are not ready, a call that finds its model gone (another
            gateway unloaded it) loads it again and retries, and unload_models() gives them back. None: the fixed
            models "tokenizer", "lam", "dynamics" of a one-world Triton.
        metrics: routing counters to share (several backends, one per catalogue version, count into one set).
    """

    def __init__(self, url: str, timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 0.05,
                 reconnect_s: float = 0.25, model_urls: dict[str, str] | None = None,
                 health: HealthPolicy | None = None, registry: CollectorRegistry | None = None,
                 tls: TritonClientTLS | None = None, tls_check_s: float = 10.0, models: VersionModels | None = None,
                 metrics: RoutingMetrics | None = None) -> None:
        unknown = set(model_urls or {}) - set(P.MODELS)
        if unknown:
            raise ValueError(f"unknown Triton models {sorted(unknown)}; expected some of {list(P.MODELS)}")
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        # One server for all three models, or one per model (a Deployment each, as the Helm chart runs them).
        self.urls = {m: (model_urls or {}).get(m, url) for m in P.MODELS}
        self.endpoints = {m: EndpointSet(parse_endpoints(self.urls[m]), health) for m in P.MODELS}
        self.metrics = metrics or RoutingMetrics(registry)
        self.models = models
        self.names = models.names() if models is not None else {m: m for m in P.MODELS}  # kind -> Triton model name
        self.reconnect_s = reconnect_s
        self._tls, self.tls_check_s = tls, tls_check_s
        self._tls_kwargs = tls.client_kwargs() if tls is not None else {}
        self._tls_digest = tls.digest() if tls is not None else None
        self._tls_checked = time.monotonic()
        self._retired: list[tuple[float, triton_aio.InferenceServerClient]] = []  # (close after, client)
        self.spec: WorldSpec | None = None
        self.lam_frames = 0  # the longest clip the LAM takes, published in its config
        self._clients: dict[str, triton_aio.InferenceServerClient] = {}  # by URL
        self._spread = itertools.count()  # keys of stateless calls: consecutive calls rank endpoints differently

    def _connect(self, url: str) -> triton_aio.InferenceServerClient:
        if url not in self._clients:
            ms = int(self.reconnect_s * 1000)
            self._clients[url] = triton_aio.InferenceServerClient(url, channel_args=[
                ("grpc.max_send_message_length", 2**31 - 1),
                ("grpc.max_receive_message_length", 2**31 - 1),
                ("grpc.initial_reconnect_backoff_ms", min(ms, 50)),
                ("grpc.max_reconnect_backoff_ms", ms),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
            ], **self._tls_kwargs)
        return self._clients[url]

    async def start(self) -> None:
        """Reads the WorldSpec the dynamics model publishes and checks every model is ready (else BackendUnavailable;
        BackendCredentialsRejected, which says why, when TLS fails on certificates)."""
        if self.spec is not None:
            return
        try:
            await self._start()
        except BackendUnavailable as exc:
            # gRPC says only "unavailable" (or "Socket closed"); a handshake of our own names a certificate problem.
            problem = await self._certificate_problem()
            if problem is None:
                raise
            raise BackendCredentialsRejected(f"TLS to Triton at {problem}; check --triton-ca/--triton-cert/--triton-key "
                                             f"(GENIE_TRITON_CA/CERT/KEY) [{exc}]") from exc

    async def _certificate_problem(self) -> str | None:
        if self._tls is None:
            return None
        for url in dict.fromkeys(url for model in P.MODELS for url in self.endpoints[model].endpoints):
            problem = await asyncio.to_thread(self._tls.certificate_problem, url)
            if problem is not None:
                return f"{url} fails: {problem}"
        return None

    async def _start(self) -> None:
        if self.models is not None:  # the three models load side by side, at every endpoint of each
            jobs = [(m, url) for m in P.MODELS for url in self.endpoints[m].endpoints]
            errors = await asyncio.gather(*(self._load(m, url) for m, url in jobs))
            for model in P.MODELS:
                failed = [e for (m, _), e in zip(jobs, errors, strict=True) if m == model]
                if failed and all(failed):  # nowhere loaded: say why instead of "not ready", and hold nothing
                    await self.unload_models()  # the kinds that did load: a version is whole or not served
                    raise BackendUnavailable(f"Triton could not load {self.names[model]} ({self.urls[model]}): "
                                             f"{failed[0]}")
        dyn = await self._call(P.DYNAMICS, "get config", lambda c: c.get_model_config(
            self.names[P.DYNAMICS], as_json=True, client_timeout=self.timeout_s))
        lam = await self._call(P.LAM, "get config", lambda c: c.get_model_config(
            self.names[P.LAM], as_json=True, client_timeout=self.timeout_s))
        try:
            spec = WorldSpec.from_dict(json.loads(_param(dyn, P.PARAM_WORLD_SPEC)))
            self.lam_frames = int(_param(lam, P.PARAM_MAX_FRAMES))
        except (KeyError, ValueError, TypeError) as exc:
            raise BackendError(f"Triton at {self.urls[P.DYNAMICS]}: the models do not publish a usable world spec: {exc}") from exc
        for model in P.MODELS:  # at least one endpoint of each model is ready (a call fails over to it)
            await self._call(model, "check ready", lambda c, m=model: self._require_ready(c, m))
        self.spec = spec

    async def _require_ready(self, client: triton_aio.InferenceServerClient, model: str) -> None:
        if not await client.is_model_ready(self.names[model], client_timeout=self.timeout_s):
            raise InferenceServerException(f"model {self.names[model]} is not ready", status=_UNAVAILABLE)

    async def _load(self, model: str, url: str) -> str | None:
        """Loads this version's `model` at one endpoint unless it is ready there; returns why it failed, or None.
        A failure is logged, not raised: the calls that follow fail over from that endpoint."""
        assert self.models is not None
        try:
            await self.models.ensure_loaded(self._connect(url), model)
            return None
        except InferenceServerException as exc:
            problem = exc.message() or str(exc)
        except OSError as exc:
            problem = str(exc)
        log.warning("Triton at %s could not load %s: %s", url, self.names[model], problem)
        return problem

    async def unload_models(self) -> None:
        """Unloads this version's models at every endpoint (a catalogue version evicted under the models budget)."""
        if self.models is None:
            return
        await asyncio.gather(*(self.models.unload(self._connect(url), m) for m in P.MODELS
                               for url in self.endpoints[m].endpoints))

    def _check_started(self) -> WorldSpec:
        if self.spec is None:
            raise RuntimeError("TritonBackend.start() was not awaited")
        return self.spec

    async def encode(self, frames: np.ndarray) -> np.ndarray:
        spec = self._check_started()
        check_frames(frames, spec, 1, spec.window)
        inputs = [_tensor(P.FRAMES, _pad(frames, spec.window)), _tensor(P.NUM_FRAMES, np.int32(frames.shape[0]))]
        return await self._infer(P.TOKENIZER, inputs, P.TOKENS, self._stateless())  # (t, N)

    async def next_tokens(self, state: WorldState, action: int, sampling: SamplingConfig) -> np.ndarray:
        spec = self._check_started()
        if not 0 <= int(action) < spec.num_actions:
            raise ValueError(f"action {action} is out of range [0, {spec.num_actions})")
        check_state(state, spec)
        return await self._infer(P.DYNAMICS, _step_inputs(state, action, sampling, spec.window), P.NEXT_TOKENS,
                                 state.session_id)  # (N,)

    async def decode_last(self, state: WorldState) -> np.ndarray:
        spec = self._check_started()
        check_state(state, spec)
        return await self._infer(P.TOKENIZER, _window(state, spec.window), P.FRAME, state.session_id)  # (H, W, C)

    async def infer_actions(self, frames: np.ndarray) -> np.ndarray:
        spec = self._check_started()
        check_frames(frames, spec, 2, self.lam_frames)
        inputs = [_tensor(P.FRAMES, _pad(frames, self.lam_frames)), _tensor(P.NUM_FRAMES, np.int32(frames.shape[0]))]
        return await self._infer(P.LAM, inputs, P.LATENT_ACTIONS, self._stateless())  # (t - 1,)

    async def ready(self) -> bool:
        """True when every model has at least one endpoint that says it is ready."""
        for model in P.MODELS:
            await self._refresh(model)
            if not any([await self._endpoint_ready(url, model) for url in self.endpoints[model].endpoints]):
                return False
        return True

    async def _endpoint_ready(self, url: str, model: str) -> bool:
        try:
            return await self._connect(url).is_model_ready(self.names[model], client_timeout=self.timeout_s)
        except (InferenceServerException, OSError):
            return False

    def _stateless(self) -> str:
        return f"#{next(self._spread)}"

    async def close(self) -> None:
        for client in [*self._clients.values(), *(c for _, c in self._retired)]:
            await client.close()
        self._clients.clear()
        self._retired.clear()

    async def _follow_tls_files(self) -> None:
        """Reconnects with renewed TLS files (see `tls_check_s`) and closes connections retired long enough ago."""
        now = time.monotonic()
        while self._retired and self._retired[0][0] <= now:
            await self._retired.pop(0)[1].close()
        if self._tls is None or now - self._tls_checked < self.tls_check_s:
            return
        self._tls_checked = now
        digest = self._tls.digest()
        if digest is None or digest == self._tls_digest:
            return
        self._tls_digest = digest
        log.info("Triton TLS files changed: new connections use them")
        grace = now + self.timeout_s * (self.retries + 1) + 1.0  # past the deadline of any call made on them
        self._retired += [(grace, client) for client in self._clients.values()]
        self._clients.clear()

    async def statistics(self, model: str, url: str | None = None) -> dict:
        """Triton's inference statistics of one model (counts, batch sizes, timings) as JSON, at one endpoint
        (default: whichever answers first)."""
        fn = lambda c: c.get_inference_statistics(self.names[model], as_json=True, client_timeout=self.timeout_s)  # noqa: E731
        if url is not None:
            return await fn(self._connect(url))
        return await self._call(model, "statistics", fn)

    async def _infer(self, model: str, inputs: list[InferInput], output: str, key: str = "") -> np.ndarray:
        result, url = await self._call(model, "infer", lambda c: c.infer(
            self.names[model], inputs, outputs=[InferRequestedOutput(output)], client_timeout=self.timeout_s), key,
            with_url=True)
        self.metrics.calls.labels(model, url).inc()
        value = result.as_numpy(output)
        if value is None or value.shape[:1] != (1,):
            raise BackendError(f"Triton model {model!r} at {url} returned no {output} for one item")
        return value[0].copy()  # drop the batch axis; a writable array, as the in-process backend returns

    async def _refresh(self, model: str) -> None:
        await self._follow_tls_files()
        for gone in await self.endpoints[model].refresh():
            if gone in self._clients and not any(gone in s.endpoints for s in self.endpoints.values()):
                await self._clients.pop(gone).close()

    async def _call(self, model: str, what: str, fn: Callable[[triton_aio.InferenceServerClient], Awaitable[T]],
                    key: str = "", with_url: bool = False):
        """Runs fn(client) at the endpoints `key` routes to, in rank order, failing over from an endpoint that is
        unavailable, too slow or lacks the model; when all fail, retries after a backoff. Maps Triton's errors to
        the backend's exceptions. Returns fn's result (and the endpoint that answered, if `with_url`)."""
        await self._refresh(model)
        endpoints = self.endpoints[model]
        failure: tuple[str, InferenceServerException] | None = None
        reloaded = False
        for attempt in range(self.retries + 1):
            order = endpoints.route(key)
            if not order:
                raise BackendUnavailable(f"Triton model {model!r}: no endpoint ({self.urls[model]} names none now)")
            for url in order:
                try:
                    result = await fn(self._connect(url))
                except InferenceServerException as exc:
                    if exc.status() not in _FAILOVER:
                        raise _error(model, url, what, exc, self.timeout_s) from exc
                    endpoints.mark_down(url)
                    self.metrics.failovers.labels(model, url).inc()
                    failure = (url, exc)
                    continue
                endpoints.mark_up(url)
                return (result, url) if with_url else result
            if self.models is not None and not reloaded and _missing(failure[1]):
                reloaded = True  # another gateway unloaded this version: load it again, once per call
                await asyncio.gather(*(self._load(model, url) for url in order))
                continue
            if attempt < self.retries and failure[1].status() == _UNAVAILABLE:
                await asyncio.sleep(self.backoff_s * 2**attempt)
                continue
            break
        url, exc = failure
        where = ", ".join(order) if len(order) > 1 else url
        raise _error(model, where, f"{what}, {attempt + 1} attempts", exc, self.timeout_s) from exc


def _error(model: str, where: str, what: str, exc: InferenceServerException, timeout_s: float) -> Exception:
    """The backend's exception for a Triton error at `where` (one endpoint, or every endpoint tried)."""
    status, message, where = exc.status(), exc.message(), f"Triton model {model!r} at {where}"
    if status == _UNAVAILABLE:
        return BackendUnavailable(f"{where} is unavailable ({what}): {message}")
    if status == _DEADLINE:
        return BackendUnavailable(f"{where} did not answer in {timeout_s:g} s ({what})")
    if status == _NOT_FOUND:
        return BackendUnavailable(f"{where} is not loaded ({what}): {message}")
    if status == _INVALID:
        return ValueError(f"{where} rejected the request: {message}")
    return BackendError(f"{where} failed ({what}, {status}): {message}")


def _missing(exc: InferenceServerException) -> bool:
    """Whether Triton answered that the model is not loaded (unknown, or not ready), rather than being down."""
    message = (exc.message() or "").lower()
    return exc.status() == _NOT_FOUND or "unknown model" in message or "not ready" in message or "not found" in message


def _param(config: dict, key: str) -> str:
    """A string parameter of a model config fetched as JSON (get_model_config(as_json=True))."""
    return config["config"]["parameters"][key]["string_value"]


def _tensor(name: str, value: np.ndarray | np.generic) -> InferInput:
    """One request item: the value with a batch axis of 1 (scalars become (1, 1))."""
    array = np.asarray(value)
    array = array.reshape(1, *(array.shape or (1,)))
    dtype = "BYTES" if array.dtype == object else _DTYPES[array.dtype]
    tensor = InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


_DTYPES = {np.dtype(np.uint8): "UINT8", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64", np.dtype(np.float64): "FP64"}


def _pad(x: np.ndarray, rows: int, fill: int = 0) -> np.ndarray:
    """(t, ...) -> (rows, ...), the first t rows being x: fixed shapes let Triton batch different lengths."""
    out = np.full((rows, *x.shape[1:]), fill, dtype=x.dtype)
    out[: x.shape[0]] = x
    return out


def _window(state: WorldState, window: int) -> list[InferInput]:
    """The inputs naming a session's token window: WINDOW_TOKENS (W, N) padded, NUM_FRAMES, SESSION_ID."""
    tokens = state.tokens.numpy().astype(np.int32)
    return [
        _tensor(P.WINDOW_TOKENS, _pad(tokens, window)),
        _tensor(P.NUM_FRAMES, np.int32(tokens.shape[0])),
        _tensor(P.SESSION_ID, np.array(state.session_id.encode(), dtype=object)),
    ]


def _step_inputs(state: WorldState, action: int, sampling: SamplingConfig, window: int) -> list[InferInput]:
    """A dynamics request (not validated: next_tokens checks first)."""
    return [
        *_window(state, window),
        _tensor(P.WINDOW_ACTIONS, _pad(state.actions.numpy().astype(np.int32), window, fill=-1)),
        _tensor(P.SEED, np.int64(state.seed)),
        _tensor(P.STEP, np.int64(state.step)),
        _tensor(P.VERSION, np.int64(state.version)),
        _tensor(P.ACTION, np.int32(action)),
        _tensor(P.SAMPLING_STEPS, np.int32(sampling.steps)),
        _tensor(P.TEMPERATURE, np.float64(sampling.temperature)),
        _tensor(P.SCHEDULE, np.array(sampling.schedule.encode(), dtype=object)),
        _tensor(P.CHOICE_TEMPERATURE, np.float64(sampling.choice_temperature)),
        _tensor(P.GUIDANCE, np.float64(sampling.guidance)),
    ]
