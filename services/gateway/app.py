"""Assembles a gateway process: model backend + session store + SessionService, served over gRPC, the web
page and Prometheus metrics. `GatewayConfig` picks the implementations (embedded defaults or real services)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from genie.catalog import DirectoryCatalog, WorldVersion
from genie.device import resolve_inference_device, resolve_precision
from services.backends.admission import AdmissionBackend, AdmissionConfig, AdmissionGate
from services.backends.backend import BackendUnavailable, ModelBackend
from services.backends.factory import BackendConfig, make_backend, triton_tls
from services.backends.worlds import ServedWorlds
from services.gateway.api.grpc_server import GrpcServer
from services.gateway.metrics import GatewayMetrics
from services.gateway.security.auth import Authenticator, new_token
from services.gateway.security.tls import CertificateReloader, server_tls_from
from services.gateway.sessions import Limits, SessionService
from services.gateway.stores.store import SessionStore, StoreUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewayConfig:
    world: str = "worlds/demo"  # world dir: the in-process backend's models, and the page's prompt images
    # A world catalogue (genie/catalog.py) instead of one world: sessions choose a world by name and stay pinned to a
    # version; versions load on first use and idle ones unload to keep their models within `models_budget_bytes`.
    registry: str = ""
    default_world: str = ""  # the catalogue's world a session gets when it names none ("" = the only one there is)
    models_budget_bytes: int = 2 << 30  # model memory (checkpoint bytes) of the versions loaded at once; 0 = no limit
    backend: str = "inprocess"  # "inprocess" (embedded default) or "triton"
    # Triton endpoints: "host:port", several comma-separated replicas, or "dns:name:port" (every A record of a
    # headless Service); a session's calls stick to one replica (services/backends/routing.py).
    triton_url: str = "127.0.0.1:8001"
    triton_model_urls: str = ""  # "tokenizer=host:port,dynamics=a:port,b:port,lam=...": endpoints per model
    triton_tls: bool = False  # gRPC over TLS to Triton (implied by triton_ca / triton_cert)
    triton_ca: str = ""  # PEM CA that signed Triton's certificate (empty = the system CAs)
    triton_cert: str = ""  # client certificate + key for a Triton with --grpc-use-ssl-mutual
    triton_key: str = ""
    store: str = "memory"  # "memory" (embedded default, one gateway only) or "redis"
    redis_url: str = "redis://127.0.0.1:6379/0"  # or redis[s]+sentinel://host:port,.../MASTER[/DB]; rediss = TLS
    redis_sentinels: str = ""  # "host:port,host:port,...": find the master through Sentinel (with redis_master)
    redis_master: str = ""  # the name the sentinels monitor
    redis_wait_replicas: int = 0  # a step is acknowledged only after this many replicas have it (Redis WAIT)
    redis_wait_ms: int = 100  # how long WAIT may take; past it the step answers UNAVAILABLE + its version
    # Passwords stay out of the config's repr (it may be logged).
    redis_password: str = field(default="", repr=False)  # used when the URL has none; CLI: env GENIE_REDIS_PASSWORD
    # The Sentinels' own requirepass (none by default); the CLI reads it from env GENIE_REDIS_SENTINEL_PASSWORD only.
    redis_sentinel_password: str = field(default="", repr=False)
    redis_ca: str = ""  # PEM CA of the Redis servers, Sentinels too (rediss:// URLs only; empty = system CAs)
    redis_cert: str = ""  # client certificate + key, for a Redis with tls-auth-clients yes
    redis_key: str = ""
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8080  # web play page + JSON API; 0 = a free port, -1 = off
    metrics_port: int = 9090  # Prometheus /metrics; -1 = off
    tokens: str = ""  # "client:token,..." or "@tokens.json"; empty = one fresh token for client "local"
    threads: int = 0  # torch threads of the in-process backend (0 = torch's default)
    cache_bytes: int = 1 << 30  # in-process backend: K/V cache budget of each engine (idle caches evicted, LRU)
    device: str = "auto"  # in-process backend: auto (a GPU when torch sees one) | cpu | cuda | cuda:N
    precision: str = "auto"  # in-process backend: auto (bf16 on a GPU, fp32 on a CPU) | fp32 | bf16
    # TLS on the client-facing ports (PEM paths; "" = GENIE_TLS_CERT/KEY/CLIENT_CA, and none of them = plaintext).
    # The gRPC port and the web page share the certificate; a client CA makes gRPC mutual (the page never is).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    plaintext_grpc_port: int = -1  # with TLS: a plaintext gRPC port as well (0 = a free one); -1 = none
    tls_reload_s: float = 10.0  # re-read the TLS files this often, serving a renewed certificate (0 = SIGHUP only)
    limits: Limits = field(default_factory=Limits)
    admission: AdmissionConfig | None = field(default_factory=AdmissionConfig)  # None = model calls never shed

    def backend_config(self) -> BackendConfig:
        """The model backend's part of this config."""
        return BackendConfig(**{f.name: getattr(self, f.name) for f in fields(BackendConfig)})

    def __post_init__(self) -> None:
        if self.backend not in ("inprocess", "triton"):
            raise ValueError(f"backend must be inprocess or triton, got {self.backend!r}")
        if self.store not in ("memory", "redis"):
            raise ValueError(f"store must be memory or redis, got {self.store!r}")
        if self.models_budget_bytes < 0:
            raise ValueError(f"models_budget_bytes must be >= 0, got {self.models_budget_bytes}")
        if self.backend == "inprocess":  # a GPU that is absent, or bf16 on a CPU without it: refused before serving
            resolve_precision(self.precision, resolve_inference_device(self.device))
        if not self.tls_reload_s >= 0:  # NaN too
            raise ValueError(f"tls_reload_s must be >= 0 seconds, got {self.tls_reload_s}")
        if self.redis_wait_replicas < 0 or self.redis_wait_ms < 0:
            raise ValueError(f"redis wait replicas/ms must be >= 0, got {self.redis_wait_replicas}, {self.redis_wait_ms}")
        if self.backend == "triton":
            triton_tls(self.backend_config())  # unreadable certificate files fail at startup
        if self.store == "redis":
            redis_target(self)  # a bad spec fails at startup


def redis_target(cfg: GatewayConfig):
    """The RedisTarget the config names: URL or Sentinel set, plus passwords and TLS files."""
    from services.gateway.stores.redis_store import RedisTarget, RedisTLS

    target = RedisTarget.parse(cfg.redis_url, cfg.redis_sentinels, cfg.redis_master)
    tls = RedisTLS(cfg.redis_ca, cfg.redis_cert, cfg.redis_key) if (cfg.redis_ca or cfg.redis_cert) else None
    return target.with_credentials(cfg.redis_password, tls, cfg.redis_sentinel_password)


def make_store(cfg: GatewayConfig) -> SessionStore:
    if cfg.store == "redis":
        from services.gateway.stores.redis_store import RedisStore

        return RedisStore(redis_target(cfg), wait_replicas=cfg.redis_wait_replicas, wait_ms=cfg.redis_wait_ms)
    from services.gateway.stores.memory_store import MemoryStore

    return MemoryStore()


def served_catalogue(cfg: GatewayConfig, registry=None) -> ServedWorlds:
    """The catalogue's worlds, each version through its own backend (with admission when configured): in-process
    models, or its own models on a Triton with explicit model control (`genie triton serve --explicit`)."""
    metrics = None
    gate = AdmissionGate(cfg.admission) if cfg.admission is not None else None  # one budget for every version
    if cfg.backend == "triton":
        from services.backends.triton_backend import RoutingMetrics

        metrics = RoutingMetrics(registry)  # one set of counters for every version's backend

    def make(entry: WorldVersion) -> ModelBackend:
        backend = make_backend(cfg.backend_config(), registry, version=entry, metrics=metrics)
        return AdmissionBackend(backend, gate=gate) if gate is not None else backend

    return ServedWorlds(catalog=DirectoryCatalog(cfg.registry), make=make, default=cfg.default_world,
                        budget_bytes=cfg.models_budget_bytes)


class Gateway:
    """One gateway process. Backend and store may be injected (tests run several gateways over one store)."""

    def __init__(self, cfg: GatewayConfig, backend: ModelBackend | None = None, store: SessionStore | None = None,
                 metrics: GatewayMetrics | None = None) -> None:
        self.cfg = cfg
        # First, before any model loads: bad certificate files are a ValueError here (the CLI's one-line exit 2).
        self.tls = server_tls_from(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)  # bad files: ValueError, here
        if self.tls is None and cfg.plaintext_grpc_port >= 0:
            raise ValueError("a plaintext gRPC port is only for beside a TLS one: the gRPC port is plaintext already")
        self.token = None
        if cfg.tokens:
            auth = Authenticator.from_spec(cfg.tokens)
        else:
            self.token = new_token()
            auth = Authenticator({self.token: "local"})
        metrics = metrics or GatewayMetrics()
        self.certificates = None if self.tls is None else CertificateReloader(
            self.tls, on_result=lambda result: metrics.tls_reloads.labels(result).inc())
        self._reload_task: asyncio.Task | None = None
        self.store = store or make_store(cfg)
        if cfg.registry:
            self.backend = None
            self.worlds = served_catalogue(cfg, metrics.registry)
        else:
            self.backend = self._admitted(backend or make_backend(cfg.backend_config(), metrics.registry))
            self.worlds = ServedWorlds(single=self.backend)
        self.service = SessionService(self.worlds, self.store, auth, cfg.limits, metrics)
        self.grpc: GrpcServer | None = None
        self._web_runner = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_server = None

    def _admitted(self, backend: ModelBackend) -> ModelBackend:
        return AdmissionBackend(backend, self.cfg.admission) if self.cfg.admission is not None else backend

    async def start(self) -> None:
        verify = getattr(self.store, "verify", None)
        if verify is not None:  # a refused password or certificate raises StoreMisconfigured: exit at startup
            try:
                await verify()
            except StoreUnavailable as exc:  # down is not misconfigured: health says NOT_SERVING until it is up
                log.warning("session store not available yet, serving UNAVAILABLE until it is: %s", exc)
        try:
            if self.backend is not None:  # a catalogue's versions load on first use
                await self.backend.start()
        except BackendUnavailable as exc:  # serve anyway: health says NOT_SERVING and calls retry the backend
            log.warning("model backend not available yet, serving UNAVAILABLE until it is: %s", exc)
        plaintext = self.cfg.plaintext_grpc_port if self.cfg.plaintext_grpc_port >= 0 else None
        self.grpc = GrpcServer(self.service, self.cfg.host, self.cfg.grpc_port, plaintext_port=plaintext,
                               credentials=self.certificates.grpc_credentials() if self.certificates else None)
        await self.grpc.start()
        if self.cfg.http_port >= 0:
            from aiohttp import web

            from services.gateway.api.web import create_web_app

            prompts = None if self.cfg.registry else Path(self.cfg.world)  # a catalogue's come with each version
            self._web_runner = web.AppRunner(create_web_app(self.service, prompts), access_log=None)
            await self._web_runner.setup()
            site = web.TCPSite(self._web_runner, self.cfg.host, self.cfg.http_port,
                               ssl_context=self.certificates.ssl_context() if self.certificates else None)
            await site.start()
            self.http_port = self._web_runner.addresses[0][1]  # the bound port (a free one when asked for 0)
        if self.cfg.metrics_port >= 0:
            self._metrics_server, _ = self.service.metrics.serve(self.cfg.metrics_port, self.cfg.host)
            self.metrics_port = self._metrics_server.server_port
        if self.certificates is not None and self.cfg.tls_reload_s > 0:
            self._reload_task = asyncio.create_task(self._reload_certificates(self.cfg.tls_reload_s))

    def reload_tls(self) -> bool | None:
        """Re-reads the TLS files now (SIGHUP): True switched, False refused (old one serves on), None unchanged."""
        return None if self.certificates is None else self.certificates.check()

    async def _reload_certificates(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            self.reload_tls()

    @property
    def grpc_address(self) -> str:
        assert self.grpc is not None, "start() first"
        return self.grpc.address

    def page_url(self) -> str | None:
        if self.http_port is None:
            return None
        fragment = f"#token={self.token}" if self.token else ""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.cfg.host}:{self.http_port}/{fragment}"

    async def stop(self, part_timeout_s: float = 30.0) -> None:
        """Stops serving, then closes the models and the session store, each part bounded by `part_timeout_s`: a part
        that does not finish (a peer that never answers a close) is logged by name and left behind, and the parts after
        it still close: a shutdown (a pod's SIGTERM, a test's teardown) always ends, and says what it could not close."""
        if self._reload_task is not None:
            self._reload_task.cancel()
        parts: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        if self.grpc is not None:
            parts.append(("gRPC server", self.grpc.stop))
        if self._web_runner is not None:
            parts.append(("web page", self._web_runner.cleanup))
        if self._metrics_server is not None:
            parts.append(("metrics server", lambda: asyncio.to_thread(_close_http_server, self._metrics_server)))
        parts += [("model backend", self.worlds.close), ("session store", self.store.close)]
        for name, close in parts:
            try:
                await asyncio.wait_for(close(), part_timeout_s)
            except TimeoutError:
                log.error("gateway stop: the %s did not close within %.0f s; left behind", name, part_timeout_s)
            except Exception:  # one part failing to close must not keep the others open
                log.exception("gateway stop: closing the %s failed", name)


def _close_http_server(server) -> None:
    server.shutdown()
    server.server_close()


async def serve_forever(gateway: Gateway, on_ready=None) -> None:
    """Starts the gateway, calls on_ready(gateway), and runs until SIGINT/SIGTERM."""
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, gateway.reload_tls)
    try:
        if on_ready is not None:
            on_ready(gateway)
        await stop.wait()
    finally:
        await gateway.stop()
