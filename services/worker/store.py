"""Job bookkeeping in the broker's Redis, beside Celery's messages and results: job records, cancel flags, leases.

Keys (all expire after RESULT_TTL_S):
    genie:jobs:v1:job:{id}      JSON record written at submit: kind, spec, totals, chunk count, submit time
    genie:jobs:v1:cancel:{id}   set by `genie jobs cancel`; tasks check it between steps/items (the solo pool cannot
                                be interrupted by Celery's revoke(terminate=True))
    genie:jobs:v1:lease:{task}  "hostname pid" of the worker running that task now, renewed while it runs; a
                                redelivered copy that finds it held leaves the job to the live holder
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any

import redis

from services.worker.settings import RESULT_TTL_S

PREFIX = "genie:jobs:v1:"
# Deletes/renews a lease only while it still holds our token: a lease that expired and was retaken stays intact.
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end return 0"


class JobStore:
    def __init__(self, url: str, client: redis.Redis | None = None, **redis_kwargs) -> None:
        """`redis_kwargs`: extra redis-py options, e.g. a password and ssl_ca_certs (see from_settings); `client`: a
        ready client instead (one through Sentinel), `url` then only names the store in messages."""
        self.url = url
        self._sentinels: list[redis.Redis] = []  # the Sentinel clients behind `client`, closed with it
        self.redis = client or redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, **redis_kwargs)

    @classmethod
    def from_settings(cls, settings) -> JobStore:
        """The job store of WorkerSettings: its store URL with the broker's password and TLS files; with
        GENIE_BROKER_SENTINELS, the master the Sentinels name now (redis-py asks again after a failover)."""
        from urllib.parse import unquote, urlsplit

        from services.worker.settings import redis_db

        url = settings.store_url
        kw = settings.ssl_options(url) or {}
        password = unquote(urlsplit(url).password or "") or settings.redis_password  # one in the URL wins
        if not settings.sentinels:
            if settings.redis_password:
                kw["password"] = settings.redis_password  # a password in the URL wins (redis-py's from_url)
            return cls(url, **kw)
        from redis.sentinel import Sentinel

        if kw:
            kw["ssl"] = True
        timeouts = {"socket_connect_timeout": 5, "socket_timeout": 30}
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries per Sentinel: redis-py already tries the next one, and a refused Sentinel password would
        # otherwise be retried 10 times per Sentinel on every master lookup.
        sentinel_kw = {**settings.sentinel_kwargs(url), "retry": Retry(NoBackoff(), 0)}
        sentinel = Sentinel(settings.sentinel_hosts, sentinel_kwargs=sentinel_kw, **timeouts)
        client = sentinel.master_for(settings.sentinel_master, db=redis_db(url), password=password or None, **kw)
        where = f"Redis master {settings.sentinel_master!r} via Sentinel {settings.sentinels}, DB {redis_db(url)}"
        store = cls(where, client=client)
        store._sentinels = sentinel.sentinels
        return store

    def put_record(self, job_id: str, record: dict[str, Any]) -> None:
        self.redis.set(PREFIX + f"job:{job_id}", json.dumps(record), ex=RESULT_TTL_S)

    def record(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(PREFIX + f"job:{job_id}")
        return json.loads(raw) if raw else None

    def request_cancel(self, job_id: str) -> None:
        self.redis.set(PREFIX + f"cancel:{job_id}", str(time.time()), ex=RESULT_TTL_S)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(PREFIX + f"cancel:{job_id}"))

    def lease_holder(self, task_id: str) -> str | None:
        raw = self.redis.get(PREFIX + f"lease:{task_id}")
        return raw.decode() if raw else None

    def lease(self, task_id: str, holder: str, ttl: int) -> Lease | None:
        """Claims `task_id` for `holder`, renewed in the background until released; None if someone holds it."""
        key = PREFIX + f"lease:{task_id}"
        if not self.redis.set(key, holder, nx=True, ex=ttl):
            return None
        return Lease(self.redis, key, holder, ttl)

    def close(self) -> None:
        self.redis.close()
        for sentinel in self._sentinels:
            sentinel.close()


class Lease:
    """A claim renewed by a daemon thread: it dies with the process, so a SIGKILLed worker's claim lapses in ttl s."""

    def __init__(self, client: redis.Redis, key: str, token: str, ttl: int) -> None:
        self.client, self.key, self.token, self.ttl = client, key, token, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="genie-job-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            # Redis briefly away: the next tick retries; the claim lapses only after a whole ttl.
            with contextlib.suppress(redis.RedisError):
                self.client.eval(_RENEW, 1, self.key, self.token, self.ttl)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):  # else the claim lapses by itself
            self.client.eval(_RELEASE, 1, self.key, self.token)
