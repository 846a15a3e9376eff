"""Worker settings from the environment (the Helm chart's contract) and the Celery configuration built from them.

Redis with failover: GENIE_BROKER_SENTINELS=host:port,... + GENIE_BROKER_SENTINEL_MASTER=NAME make the broker, the
result backend and the job records follow the master the Sentinels name (kombu's and Celery's `sentinel://`
transports, redis-py's Sentinel for the records). GENIE_BROKER_URL and GENIE_RESULT_BACKEND still say the DB, the
data password and TLS (rediss://: TLS to the Sentinels and the master alike, with GENIE_BROKER_CA/CERT/KEY);
GENIE_BROKER_SENTINEL_PASSWORD is the Sentinels' own requirepass (none by default).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from services.tls_files import check_client_files

if TYPE_CHECKING:
    from celery import Celery

# celery and kombu are imported where they are used: the `genie` CLI (`genie train` under torchrun in a training
# pod or on a GPU box) imports this module for DEFAULT_BROKER and needs no Celery to train.

DEFAULT_BROKER = "redis://127.0.0.1:6379/1"
QUEUES = ("train", "rollout")
RESULT_TTL_S = 7 * 24 * 3600  # job records, results and cancel flags live this long


@dataclass(frozen=True)
class WorkerSettings:
    broker_url: str = DEFAULT_BROKER
    result_backend: str = ""  # "" = the broker URL
    jobs_dir: str = "runs/jobs"  # job outputs when a job names no path: JOBS_DIR/<job id>
    # Seconds one delivery of a task may run. The solo pool cannot enforce Celery's time limits, so tasks check this
    # deadline themselves between steps/items: training stops with a checkpoint and continues in a fresh delivery.
    task_time_limit: int = 3600
    # Seconds before Redis hands an unacknowledged message to another worker; must exceed task_time_limit, or a
    # running task would be delivered twice. 0 = task_time_limit + max(300, task_time_limit // 4).
    visibility_timeout: int = 0
    metrics_port: int = 9100  # Prometheus /metrics of the worker; 0 or -1 = off
    metrics_host: str = "0.0.0.0"  # a pod's metrics must be reachable from Prometheus
    rollout_backend: str = "inprocess"  # "inprocess" (the world's models in the worker) or "triton"
    world: str = "worlds/demo"  # world dir of the in-process backend (and where the CLI validates rollouts)
    registry: str = ""  # the world catalogue world jobs publish into (GENIE_REGISTRY); "" = none
    triton_url: str = "127.0.0.1:8001"
    triton_model_urls: str = ""  # "tokenizer=host:port,dynamics=host:port,lam=host:port", as `genie serve`
    rollout_device: str = "auto"  # the in-process backend's device: auto | cpu | cuda | cuda:N (GENIE_ROLLOUT_DEVICE)
    rollout_precision: str = "auto"  # auto (bf16 on a GPU, fp32 on a CPU) | fp32 | bf16 | int8 (GENIE_ROLLOUT_PRECISION)
    # gRPC over TLS to Triton for rollouts, as `genie serve --triton-tls/--triton-ca/--triton-cert/--triton-key`
    triton_tls: bool = False  # GENIE_TRITON_TLS=1 (implied by a CA or client certificate)
    triton_ca: str = ""  # GENIE_TRITON_CA: PEM CA that signed Triton's certificate
    triton_cert: str = ""  # GENIE_TRITON_CERT / GENIE_TRITON_KEY: client certificate for mutual TLS
    triton_key: str = ""
    lease_ttl: int = 60  # seconds a killed worker's claim on a job outlives it (a live one renews it every ttl/4)
    # Redis AUTH + TLS for the broker, the result backend and the job records (all of them Redis URLs):
    redis_password: str = field(default="", repr=False)  # GENIE_BROKER_PASSWORD, for each URL that carries none
    redis_ca: str = ""  # GENIE_BROKER_CA: PEM CA of the server for rediss:// URLs (empty = the system CAs)
    redis_cert: str = ""  # GENIE_BROKER_CERT + GENIE_BROKER_KEY: client certificate for tls-auth-clients yes
    redis_key: str = ""
    # Redis Sentinel: the broker, the result backend and the job records follow the master these name.
    sentinels: str = ""  # GENIE_BROKER_SENTINELS: host:port,host:port,...
    sentinel_master: str = ""  # GENIE_BROKER_SENTINEL_MASTER: the name the Sentinels monitor
    sentinel_password: str = field(default="", repr=False)  # GENIE_BROKER_SENTINEL_PASSWORD: the Sentinels' own

    def __post_init__(self) -> None:
        if not self.broker_url:
            raise ValueError("the broker URL is empty")
        if bool(self.sentinels) != bool(self.sentinel_master):
            raise ValueError("Sentinel needs both GENIE_BROKER_SENTINELS (host:port,...) and GENIE_BROKER_SENTINEL_MASTER")
        if self.sentinel_password and not self.sentinels:
            raise ValueError("GENIE_BROKER_SENTINEL_PASSWORD needs GENIE_BROKER_SENTINELS and GENIE_BROKER_SENTINEL_MASTER")
        if self.sentinels:
            self.sentinel_hosts  # noqa: B018  a malformed list fails here
            for url in (self.broker_url, self.backend_url):
                if not url.startswith(("redis://", "rediss://")):
                    raise ValueError("with GENIE_BROKER_SENTINELS the broker and result backend URLs must be "
                                     f"redis[s]://[:password@]host/DB (they give the DB, password and TLS), got {url!r}")
        check_client_files("broker", ("GENIE_BROKER_CA", self.redis_ca), ("GENIE_BROKER_CERT", self.redis_cert),
                           ("GENIE_BROKER_KEY", self.redis_key))
        if (self.redis_ca or self.redis_cert) and not any(u.startswith("rediss://") for u in (self.broker_url, self.backend_url)):
            raise ValueError("GENIE_BROKER_CA/CERT need a rediss:// broker or result backend URL")
        if self.task_time_limit < 1:
            raise ValueError(f"GENIE_TASK_TIME_LIMIT must be >= 1 s, got {self.task_time_limit}")
        if self.visibility_timeout and self.visibility_timeout <= self.task_time_limit:
            raise ValueError(f"GENIE_VISIBILITY_TIMEOUT ({self.visibility_timeout} s) must exceed GENIE_TASK_TIME_LIMIT "
                             f"({self.task_time_limit} s), or Redis redelivers tasks that are still running")
        if self.rollout_backend not in ("inprocess", "triton"):
            raise ValueError(f"GENIE_ROLLOUT_BACKEND must be inprocess or triton, got {self.rollout_backend!r}")
        if self.lease_ttl < 2:
            raise ValueError(f"GENIE_JOB_LEASE_TTL must be >= 2 s, got {self.lease_ttl}")

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    @property
    def store_url(self) -> str:
        """The Redis holding job records, cancel flags and leases: the broker's, which every client and worker knows
        (a client may not be told a separate result backend); the result backend's when the broker is not Redis."""
        for url in (self.broker_url, self.backend_url):
            if url.startswith(("redis://", "rediss://")):
                return url
        raise ValueError(f"jobs keep their records in Redis: neither {self.broker_url!r} nor {self.backend_url!r} is one")

    @property
    def sentinel_hosts(self) -> list[tuple[str, int]]:
        """GENIE_BROKER_SENTINELS as [(host, port)...]; ValueError on a malformed list."""
        out = []
        for item in (p.strip() for p in self.sentinels.split(",") if p.strip()):
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"GENIE_BROKER_SENTINELS must be host:port[,host:port...], got {self.sentinels!r}")
            out.append((host, int(port)))
        return out

    def sentinel_url(self, url: str) -> str:
        """Kombu's and Celery's form of a Redis URL's DB and password through the Sentinels:
        sentinel://[:password@]host:port/DB;sentinel://... (TLS is in the transport options)."""
        password = unquote(urlsplit(url).password or "") or self.redis_password
        auth = f":{quote(password, safe='')}@" if password else ""
        return ";".join(f"sentinel://{auth}{host}:{port}/{redis_db(url)}" for host, port in self.sentinel_hosts)

    def sentinel_kwargs(self, url: str) -> dict:
        """redis-py keyword arguments for the connections to the Sentinels: timeouts, their password, TLS when `url`
        is rediss:// (the same CA and client certificate as the master's)."""
        kw: dict = {"socket_timeout": 10, "socket_connect_timeout": 5}
        if self.sentinel_password:
            kw["password"] = self.sentinel_password
        if (tls := self.ssl_options(url)) is not None:
            kw.update(tls, ssl=True)
        return kw

    def with_auth(self, url: str) -> str:
        """`url` with the password put in when it has none (Celery and kombu take credentials from the URL only)."""
        parts = urlsplit(url)
        if not self.redis_password or parts.password or not url.startswith(("redis://", "rediss://")):
            return url
        netloc = f"{parts.username or ''}:{quote(self.redis_password, safe='')}@{parts.netloc.rpartition('@')[2]}"
        return urlunsplit(parts._replace(netloc=netloc))

    def ssl_options(self, url: str, names: str = "ssl") -> dict | None:
        """TLS options for a rediss:// `url` (None otherwise): `names="ssl"` gives redis-py's keyword arguments
        (ssl_ca_certs...), `names="celery"` the same as Celery's broker_use_ssl / redis_backend_use_ssl expect."""
        if not url.startswith("rediss://"):
            return None
        opts: dict = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        if self.redis_ca:
            opts["ssl_ca_certs"] = self.redis_ca
        if self.redis_cert:
            opts["ssl_certfile"], opts["ssl_keyfile"] = self.redis_cert, self.redis_key
        if names == "ssl":
            opts["ssl_cert_reqs"] = "required"
        return opts

    @property
    def visibility(self) -> int:
        return self.visibility_timeout or self.task_time_limit + max(300, self.task_time_limit // 4)

    @property
    def soft_deadline_s(self) -> float:
        """When a delivery stops taking new steps/items: a margin before the limit for the checkpoint and handoff."""
        return self.task_time_limit - min(120.0, 0.1 * self.task_time_limit)

    def job_dir(self, job_id: str) -> Path:
        return Path(self.jobs_dir) / job_id

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> WorkerSettings:
        env = os.environ if env is None else env
        broker = env.get("GENIE_BROKER_URL") or DEFAULT_BROKER
        values = {
            "broker_url": broker,
            "result_backend": env.get("GENIE_RESULT_BACKEND", ""),
            "jobs_dir": env.get("GENIE_JOBS_DIR") or "runs/jobs",
            "task_time_limit": _int(env, "GENIE_TASK_TIME_LIMIT", 3600),
            "visibility_timeout": _int(env, "GENIE_VISIBILITY_TIMEOUT", 0),
            "metrics_port": _int(env, "GENIE_WORKER_METRICS_PORT", 9100),
            "metrics_host": env.get("GENIE_WORKER_METRICS_HOST") or "0.0.0.0",
            "rollout_backend": env.get("GENIE_ROLLOUT_BACKEND") or "inprocess",
            "world": env.get("GENIE_WORLD") or "worlds/demo",
            "registry": env.get("GENIE_REGISTRY", ""),
            "triton_url": env.get("GENIE_TRITON_URL") or "127.0.0.1:8001",
            "triton_model_urls": env.get("GENIE_TRITON_MODEL_URLS", ""),
            "rollout_device": env.get("GENIE_ROLLOUT_DEVICE") or "auto",
            "rollout_precision": env.get("GENIE_ROLLOUT_PRECISION") or "auto",
            "triton_tls": (env.get("GENIE_TRITON_TLS") or "").lower() in ("1", "true", "yes"),
            "triton_ca": env.get("GENIE_TRITON_CA", ""),
            "triton_cert": env.get("GENIE_TRITON_CERT", ""),
            "triton_key": env.get("GENIE_TRITON_KEY", ""),
            "lease_ttl": _int(env, "GENIE_JOB_LEASE_TTL", 60),
            "redis_password": env.get("GENIE_BROKER_PASSWORD", ""),
            "redis_ca": env.get("GENIE_BROKER_CA", ""),
            "redis_cert": env.get("GENIE_BROKER_CERT", ""),
            "redis_key": env.get("GENIE_BROKER_KEY", ""),
            "sentinels": env.get("GENIE_BROKER_SENTINELS", ""),
            "sentinel_master": env.get("GENIE_BROKER_SENTINEL_MASTER", ""),
            "sentinel_password": env.get("GENIE_BROKER_SENTINEL_PASSWORD", ""),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def redis_db(url: str) -> int:
    """The DB number of a redis[s]://host/DB URL (0 without one)."""
    path = urlsplit(url).path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the Redis URL's path must be a DB number, got {path!r}")
    return int(path or 0)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "")
    if raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def celery_config(s: WorkerSettings) -> dict:
    """Celery settings: JSON only, late acks with one message in hand, and a visibility timeout above the limit."""
    from kombu import Queue

    extra: dict = {}  # TLS options and, with Sentinel, the result backend's transport options
    if (broker_ssl := s.ssl_options(s.broker_url, "celery")) is not None:
        extra["broker_use_ssl"] = broker_ssl
    if (backend_ssl := s.ssl_options(s.backend_url, "celery")) is not None:
        extra["redis_backend_use_ssl"] = backend_ssl
    urls: dict = {"broker_url": s.with_auth(s.broker_url), "result_backend": s.with_auth(s.backend_url)}
    sentinel: dict = {}
    if s.sentinels:  # kombu's and Celery's Sentinel transports: both ask the Sentinels for the master on each connect
        urls = {"broker_url": s.sentinel_url(s.broker_url), "result_backend": s.sentinel_url(s.backend_url)}
        sentinel = {"master_name": s.sentinel_master, "sentinel_kwargs": s.sentinel_kwargs(s.broker_url)}
        extra["result_backend_transport_options"] = {"master_name": s.sentinel_master,
                                                     "sentinel_kwargs": s.sentinel_kwargs(s.backend_url)}
    return {
        **extra,
        **urls,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Ack after the task ran, so a worker killed mid-job leaves the message to be redelivered...
        "task_acks_late": True,
        # ...also when a pool child dies (prefork; with --pool solo the whole worker dies and Redis redelivers).
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,  # hold one job at a time: a queued job stays takeable by idle workers
        # STARTED would overwrite a stored SUCCESS when a finished task is redelivered; tasks report PROGRESS instead.
        "task_track_started": False,
        "task_time_limit": s.task_time_limit,  # enforced by prefork pools only; tasks enforce their own deadline
        "broker_transport_options": {
            "visibility_timeout": s.visibility,
            # kombu sweeps for abandoned messages every interval * throttle seconds (100 s by default): scale the
            # sweep with the timeout, so a short test timeout also recovers promptly.
            "unacked_restore_interval": max(1, min(10, s.visibility // 8)),
            "unacked_restore_throttle": 1,
            **sentinel,
        },
        "broker_connection_retry_on_startup": True,
        "result_expires": RESULT_TTL_S,
        "task_queues": [Queue(q, routing_key=q) for q in QUEUES],
        "task_default_queue": "rollout",
        "task_routes": {
            "genie.train": {"queue": "train"},
            "genie.agent": {"queue": "train"},
            "genie.reactive": {"queue": "train"},
            "genie.finetune": {"queue": "train"},
            "genie.expert": {"queue": "train"},
            "genie.rollout": {"queue": "rollout"},
            "genie.rollout.chunk": {"queue": "rollout"},
            "genie.rollout.manifest": {"queue": "rollout"},
        },
        "worker_hijack_root_logger": True,
    }


def make_app(settings: WorkerSettings) -> Celery:
    """A Celery app on `settings`. Clients use one to send tasks by name without importing the task code."""
    from celery import Celery

    app = Celery("genie")
    app.conf.update(celery_config(settings))
    return app
