"""Redis session store: the truth about every session, shared by all gateway replicas.

Layout (prefix `genie:` by default):
    <p>s:<id>       hash {state: safetensors bytes, meta: JSON, version, owner}, expiring at the session's expiry
    <p>o:<owner>    sorted set of the owner's session ids scored by expiry (ms), for the per-client limit
    <p>r:<owner>:<second>   request counter for the rate limit, expires after 2 s
Each mutation is one Lua script, so it is atomic: a commit checks the stored version and writes only if it
is the one the step started from (compare-and-set), and a create checks the owner's count in the same step.

Failover: `RedisTarget` names either one Redis (a URL) or a Sentinel set and the master's name; with Sentinel,
the client asks the sentinels for the current master and follows a failover (calls in flight when the master
dies fail as StoreUnavailable: retryable, nothing changed that a client saw). With `wait_replicas > 0` each
create and commit is followed, on the same connection, by `WAIT wait_replicas wait_ms`; fewer acknowledgements
raise NotReplicated (the write is on the master, but a failover could lose it).

Credentials and TLS: the data password (URL or GENIE_REDIS_PASSWORD) is the master's; Sentinels that set their
own `requirepass` take a separate password, GENIE_REDIS_SENTINEL_PASSWORD (or `?sentinel_password=` in a
redis+sentinel URL; never a flag, so it stays out of argv; default: no Sentinel AUTH). The URL's scheme says TLS,
for every hop alike: `rediss://` (one Redis, or the data URL beside --redis-sentinels) and `rediss+sentinel://`
make the connections to the Sentinels and to the master they name TLS, verified against the same CA (--redis-ca)
with the same client certificate (--redis-cert/--redis-key). A password or certificate the Sentinels refuse is
StoreMisconfigured at startup, like a refused data password.

What Redis still cannot promise: replication is asynchronous and WAIT does not make it synchronous. A write
that WAIT confirmed on a replica survives the master's death only if Sentinel promotes a replica that has it
(with one replica it does; with several, Sentinel prefers the most up-to-date). A write that WAIT could not
confirm may or may not survive. During a network partition the old master may keep accepting writes that
are discarded when it rejoins as a replica (bound that window with the server's `min-replicas-to-write`).
"""

from __future__ import annotations

import logging
import math
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.gateway.stores.store import LimitExceeded, NotReplicated, SessionRecord, StoreFull, StoreUnavailable
from services.redis_errors import short_reason
from services.tls_files import check_client_files

SENTINEL_SCHEME = "redis+sentinel"
TLS_SCHEME = "rediss"
SENTINEL_TLS_SCHEME = "rediss+sentinel"
# A master that died mid-call, or no master known to the sentinels yet (ReadOnlyError, a demoted one, is told apart).
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)

T = TypeVar("T")
log = logging.getLogger(__name__)

_CREATE = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[7])
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[8]) then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'meta', ARGV[3], 'version', ARGV[4], 'owner', ARGV[5])
redis.call('PEXPIREAT', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
local t = redis.call('PEXPIRETIME', KEYS[2])
if t < tonumber(ARGV[6]) then redis.call('PEXPIREAT', KEYS[2], ARGV[6]) end
return 1
"""

_COMMIT = """
local v = redis.call('HGET', KEYS[1], 'version')
if (not v) or v ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'meta', ARGV[3], 'version', ARGV[4])
redis.call('PEXPIREAT', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[6])
local t = redis.call('PEXPIRETIME', KEYS[2])
if t < tonumber(ARGV[5]) then redis.call('PEXPIREAT', KEYS[2], ARGV[5]) end
return 1
"""

# The per-client request counter of the rate limit. allow-oom: it runs when Redis is full too (Redis >= 7, as
# PEXPIRETIME above), so a full store still rate-limits, and reads and closes, which free memory, get through; the
# counter is a few bytes per client that expire within 2 s.
_ALLOW = """#!lua flags=allow-oom
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], 2)
return n
"""

_DELETE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[1] .. owner, ARGV[2])
return 1
"""


@dataclass(frozen=True)
class RedisTarget:
    """One Redis (`url`), or a Sentinel set: `sentinels` [(host, port)...] and the `master` name they watch.

    `password` is the master's (data) password, `sentinel_password` the Sentinels' own (their `requirepass`; None =
    the Sentinels take no AUTH). `tls` holds the certificate files; a TLS target uses them toward every hop."""

    url: str = "redis://127.0.0.1:6379/0"
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    password: str | None = None
    tls: RedisTLS | None = None  # CA / client certificate files for a rediss:// or rediss+sentinel:// URL
    sentinel_password: str | None = None

    def __post_init__(self) -> None:
        if bool(self.sentinels) != bool(self.master):
            raise ValueError("a Sentinel target needs both sentinels (host:port,...) and the master's name")
        if self.tls is not None and not self.tls_scheme:
            raise ValueError(f"Redis CA/client certificates need a {TLS_SCHEME}:// or {SENTINEL_TLS_SCHEME}:// URL, "
                             f"got {self.describe_url()!r}")
        if self.sentinel_password and not self.sentinels:
            raise ValueError("a Sentinel password (GENIE_REDIS_SENTINEL_PASSWORD) needs a Sentinel target "
                             "(--redis-sentinels + --redis-master, or a redis+sentinel:// URL)")

    @property
    def tls_scheme(self) -> bool:
        """Whether the URL asks for TLS (rediss:// or rediss+sentinel://)."""
        return self.url.startswith((TLS_SCHEME + "://", SENTINEL_TLS_SCHEME + "://"))

    def with_credentials(self, password: str = "", tls: RedisTLS | None = None,
                         sentinel_password: str = "") -> RedisTarget:
        """This target with a password (used when the URL carries none, e.g. from env GENIE_REDIS_PASSWORD, so
        a pod takes it from a Secret), TLS files, and the Sentinels' password (env GENIE_REDIS_SENTINEL_PASSWORD;
        one in the URL wins). A TLS URL uses TLS even without files (system CAs)."""
        if tls is None and self.tls_scheme:
            tls = RedisTLS()
        return RedisTarget(url=self.url, sentinels=self.sentinels, master=self.master, db=self.db,
                           password=self.password or password or None, tls=tls,
                           sentinel_password=self.sentinel_password or sentinel_password or None)

    def connection_kwargs(self) -> dict:
        """redis-py keyword arguments for the data connections: the password (a password in the URL wins)
        and, for a TLS URL, the certificate files with verification required."""
        kw: dict = {}
        if self.password:
            kw["password"] = self.password
        if self.tls is not None:
            kw.update(self.tls.kwargs())
            if self.sentinels:  # from_url picks the TLS connection class by scheme; master_for needs to be told
                kw["ssl"] = True
        return kw

    def sentinel_kwargs(self) -> dict:
        """redis-py keyword arguments for the connections to the Sentinels: their password, and the same TLS."""
        kw: dict = {}
        if self.sentinel_password:
            kw["password"] = self.sentinel_password
        if self.tls is not None:
            kw.update(self.tls.kwargs(), ssl=True)
        return kw

    @classmethod
    def parse(cls, url: str, sentinels: str = "", master: str = "") -> RedisTarget:
        """From `--redis-url` and, optionally, `--redis-sentinels host:port,...` + `--redis-master NAME`.

        The URL may itself name a Sentinel set:
        `redis+sentinel://[:password@]host:port,host:port/MASTER[/DB][?sentinel_password=...]`, or
        `rediss+sentinel://...` for TLS to the Sentinels and the master. Raises ValueError with the expected form
        on a malformed spec.
        """
        if sentinels or master:  # the URL still names the DB, password and TLS (redis[s]://[:pw@]host/DB)
            parts = urlsplit(url)
            db = parts.path.strip("/")
            if db and not db.isdigit():
                raise ValueError(f"the Redis URL's path must be a DB number, got {_masked(url)!r}")
            return cls(url=url, sentinels=_hostports(sentinels), master=master.strip(), db=int(db or 0),
                       password=unquote(parts.password) if parts.password else None)
        if not url.startswith((SENTINEL_SCHEME + "://", SENTINEL_TLS_SCHEME + "://")):
            return cls(url=url)
        parts = urlsplit(url)
        path = [p for p in parts.path.split("/") if p]
        hosts = parts.netloc.rpartition("@")[2]
        query = parse_qs(parts.query)
        form = f"{parts.scheme}://[:password@]host:port[,host:port...]/MASTER[/DB][?sentinel_password=...]"
        if not 1 <= len(path) <= 2 or not hosts or (len(path) == 2 and not path[1].isdigit()) or \
                set(query) - {"sentinel_password"} or len(query.get("sentinel_password", ())) > 1:
            raise ValueError(f"expected {form}, got {_masked(url)!r}")
        password = unquote(parts.password) if parts.password else None
        return cls(url=url, sentinels=_hostports(hosts), master=path[0], db=int(path[1]) if len(path) == 2 else 0,
                   password=password, sentinel_password=query.get("sentinel_password", [None])[0])

    def __repr__(self) -> str:  # the dataclass's would print the passwords
        return f"RedisTarget({self.describe()}, db={self.db})"

    def describe_url(self) -> str:
        """The URL with any password masked (user:***@host, sentinel_password=***)."""
        return _masked(self.url)

    def describe(self) -> str:
        """For logs and error messages: never a password."""
        if not self.sentinels:
            return f"Redis at {self.describe_url()}"
        tls = " over TLS" if self.tls is not None else ""
        return f"Redis master {self.master!r} via Sentinel {','.join(f'{h}:{p}' for h, p in self.sentinels)}{tls}"


def _masked(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is not None:
        parts = parts._replace(netloc=(parts.username or "") + ":***@" + parts.netloc.rpartition("@")[2])
    if "sentinel_password=" in parts.query:
        parts = parts._replace(query=re.sub(r"sentinel_password=[^&]*", "sentinel_password=***", parts.query))
    return parts.geturl()


@dataclass(frozen=True)
class RedisTLS:
    """Certificate files for TLS to Redis: `ca` verifies the server (empty = the system's CAs); `cert` + `key`
    are the client's own certificate, for a server that sets `tls-auth-clients yes`."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    check_hostname: bool = True

    def __post_init__(self) -> None:
        check_client_files("Redis", ("--redis-ca", self.ca), ("--redis-cert", self.cert), ("--redis-key", self.key))

    def kwargs(self) -> dict:
        kw: dict = {"ssl_cert_reqs": "required", "ssl_check_hostname": self.check_hostname}
        if self.ca:
            kw["ssl_ca_certs"] = self.ca
        if self.cert:
            kw["ssl_certfile"], kw["ssl_keyfile"] = self.cert, self.key
        return kw


class StoreMisconfigured(ValueError):
    """The store refused this gateway's credentials or certificates: a deployment error, not an outage."""


_DATA_HOP = ("", "the password (GENIE_REDIS_PASSWORD) and the ACL user")
_SENTINEL_HOP = ("to the Sentinels ", "the Sentinel password (GENIE_REDIS_SENTINEL_PASSWORD)")


def _misconfiguration(exc: BaseException, hop: tuple[str, str] = _DATA_HOP) -> str | None:
    """What is wrong when `exc` means the configuration (password, ACL, certificates) is, else None.
    `hop` is (what was refused, which password to check), for the message."""
    where, password = hop
    if isinstance(exc, (AuthenticationError, NoPermissionError)):
        return f"authentication {where}failed ({exc}); check {password}"
    if isinstance(exc, ResponseError) and str(exc).startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
        return f"authentication {where}failed ({exc}); check {password}"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake {where}failed ({cause}); check the CA (--redis-ca) and client certificate"
        cause = cause.__cause__ or cause.__context__
    return None


def _refusal(exc: ResponseError, store: str, what: str) -> StoreUnavailable | None:
    """What a Redis error that refuses the call (and changed nothing) means, or None for any other error. Redis
    checks memory and persistence before a command writes (in a script: before its first write, and the scripts
    here read before they write), so a refused write left the session as it was."""
    text = str(exc)
    if isinstance(exc, OutOfMemoryError) or text.startswith("OOM"):
        return StoreFull(f"{store} is full during {what}: Redis is at its maxmemory and refuses writes (noeviction); "
                         f"closing sessions frees memory, or raise maxmemory; retry later")
    if text.startswith("MISCONF"):
        return StoreUnavailable(f"{store} refuses writes during {what}: saving to disk failed (MISCONF; is its disk "
                                f"full?); retry later", "persistence")
    if isinstance(exc, ReadOnlyError) or _demoted(exc):
        return StoreUnavailable(f"{store} unavailable during {what}: {exc} (a replica now, mid-failover)", "readonly")
    return None


def _demoted(exc: ResponseError) -> bool:
    """The node was demoted to a replica mid-failover. A write script that wrote nothing (a version that no longer
    matches) still runs there, but the WAIT after it is refused: unavailable, like READONLY, and nothing changed."""
    return "WAIT cannot be used with replica" in str(exc)


class _RetryOutages(Retry):
    """redis-py's retry of a failed connection or command (its default backoff and count), except when the server
    refused our password or certificate: retrying those only delays the error (and a health check) by seconds."""

    def __init__(self, retries: int = 10) -> None:
        super().__init__(ExponentialWithJitterBackoff(base=0.01, cap=1.0), retries=retries)

    async def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def retryable(exc: Exception) -> bool:
            return _misconfiguration(exc) is None and (is_retryable is None or is_retryable(exc))

        return await super().call_with_retry(do, fail, retryable, with_failure_count)


def _hostports(spec: str) -> tuple[tuple[str, int], ...]:
    out = []
    for item in (p.strip() for p in spec.split(",")):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"sentinels must be host:port[,host:port...], got {spec!r}")
        out.append((host, int(port)))
    if not out:
        raise ValueError("no sentinels given")
    return tuple(out)


class RedisStore:
    def __init__(self, url: str | RedisTarget = "redis://127.0.0.1:6379/0", prefix: str = "genie:", timeout_s: float = 2.0,
                 clock: Callable[[], float] = time.time, wait_replicas: int = 0, wait_ms: int = 100,
                 outage_retries: int = 10) -> None:
        """outage_retries: how often a call retries a lost connection or a timeout (backoff 10 ms doubling to 1 s):
        the default rides out a Sentinel failover (a few seconds) and reports a Redis that stays down after ~4 s."""
        if wait_replicas < 0 or wait_ms < 0 or outage_retries < 0:
            raise ValueError(f"wait_replicas, wait_ms and outage_retries must be >= 0, got {wait_replicas}, {wait_ms}, "
                             f"{outage_retries}")
        self.target = url if isinstance(url, RedisTarget) else RedisTarget.parse(url)
        self.url, self.prefix, self._clock = self.target.describe(), prefix, clock
        self.wait_replicas, self.wait_ms = wait_replicas, wait_ms
        kw = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "retry": _RetryOutages(outage_retries)}
        if self.target.sentinels:
            self._sentinel = Sentinel(list(self.target.sentinels), sentinel_kwargs={**kw, **self.target.sentinel_kwargs()},
                                      **kw)
            self._redis = self._sentinel.master_for(self.target.master, db=self.target.db,
                                                    **self.target.connection_kwargs())
        else:
            self._sentinel = None
            self._redis = aioredis.Redis.from_url(self.target.url, **kw, **self.target.connection_kwargs())
        self._create = self._redis.register_script(_CREATE)
        self._commit = self._redis.register_script(_COMMIT)
        self._delete = self._redis.register_script(_DELETE)
        self._allow = self._redis.register_script(_ALLOW)

    def _skey(self, session_id: str) -> str:
        return f"{self.prefix}s:{session_id}"

    def _okey(self, owner: str) -> str:
        return f"{self.prefix}o:{owner}"

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"session store ({self.url}) unavailable during {what}: {short_reason(exc)}") from exc
        except ResponseError as exc:
            refusal = _refusal(exc, f"session store ({self.url})", what)
            if refusal is None:
                raise
            raise refusal from exc

    async def _write(self, what: str, script, keys: list, args: list, version: int) -> int:
        """Runs a write script and, when asked, WAITs for replicas on the same connection (WAIT counts the
        acknowledgements of this connection's writes); raises NotReplicated when too few came."""
        if not self.wait_replicas:
            return await self._call(what, lambda: script(keys=keys, args=args))

        async def op() -> tuple[int, int]:
            for attempt in range(2):
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        await script(keys=keys, args=args, client=pipe)
                        pipe.execute_command("WAIT", self.wait_replicas, self.wait_ms)
                        return tuple(await pipe.execute())
                except NoScriptError:
                    # A failover between the pipeline's check that the master holds the script and its EVALSHA: the
                    # new master has never seen it, so the script ran nothing. The retry loads it there first.
                    if attempt:
                        raise
            raise AssertionError("unreachable")

        result, acked = await self._call(what, op)
        if result and acked < self.wait_replicas:
            raise NotReplicated(f"{acked} of {self.wait_replicas} replicas acknowledged within {self.wait_ms} ms", version)
        return result

    async def create(self, record: SessionRecord, max_per_owner: int) -> None:
        now_ms, exp_ms = int(self._clock() * 1000), int(record.expires * 1000)
        args = [record.session_id, record.state.to_bytes(), record.meta_json(), record.version, record.owner, exp_ms,
                now_ms, max_per_owner]
        keys = [self._skey(record.session_id), self._okey(record.owner)]
        ok = await self._write("create", self._create, keys, args, record.version)
        if not ok:
            raise LimitExceeded(f"client {record.owner!r} already has {max_per_owner} open sessions")

    async def get(self, session_id: str) -> SessionRecord | None:
        state, meta = await self._call("get", lambda: self._redis.hmget(self._skey(session_id), "state", "meta"))
        if state is None or meta is None:
            if self._sentinel is not None:
                return await self._confirmed_miss(session_id)
            return None
        return SessionRecord.from_parts(session_id, state, meta)

    async def _confirmed_miss(self, session_id: str) -> SessionRecord | None:
        """A miss through Sentinel, read again with ROLE on the same connection. Mid-failover a connection can reach
        the old master restarted as a replica that has not synced yet: it answers reads from an empty dataset, and
        the session would look gone (NOT_FOUND, which clients do not retry). Such a miss is UNAVAILABLE instead."""

        async def op() -> list:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hmget(self._skey(session_id), "state", "meta")
                pipe.execute_command("ROLE")
                return await pipe.execute(raise_on_error=False)

        (fields, role) = await self._call("get", op)
        if isinstance(fields, Exception):
            raise StoreUnavailable(f"session store ({self.url}) unavailable during get: {fields}")
        state, meta = fields
        if state is not None and meta is not None:
            return SessionRecord.from_parts(session_id, state, meta)
        role_name = role[0] if isinstance(role, (list, tuple)) and role else None
        if isinstance(role_name, bytes):
            role_name = role_name.decode()
        if role_name is not None and role_name != "master":  # (an ACL without ROLE: the miss stands, as before)
            raise StoreUnavailable(f"session store ({self.url}) unavailable during get: the node that answered is a "
                                   f"{role_name}, not the master (mid-failover)", "readonly")
        return None

    async def commit(self, record: SessionRecord, expected_version: int) -> bool:
        keys = [self._skey(record.session_id), self._okey(record.owner)]
        args = [str(expected_version), record.state.to_bytes(), record.meta_json(), record.version,
                int(record.expires * 1000), record.session_id]
        return bool(await self._write("commit", self._commit, keys, args, record.version))

    async def delete(self, session_id: str) -> bool:
        args = [f"{self.prefix}o:", session_id]
        return bool(await self._call("delete", lambda: self._delete(keys=[self._skey(session_id)], args=args)))

    async def count(self, owner: str) -> int:
        async def op() -> int:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zremrangebyscore(self._okey(owner), "-inf", int(self._clock() * 1000))
                pipe.zcard(self._okey(owner))
                return (await pipe.execute())[1]

        return await self._call("count", op)

    async def allow(self, owner: str, per_second: int) -> bool:
        key = f"{self.prefix}r:{owner}:{math.floor(self._clock())}"

        return await self._call("rate limit", lambda: self._allow(keys=[key])) <= per_second

    async def verify(self) -> None:
        """Checks the credentials at startup: raises StoreMisconfigured on a refused password or a failed TLS
        handshake, toward the Sentinels or the master (the gateway exits with that line); an unreachable store is
        left to health (NOT_SERVING)."""
        if self._sentinel is not None:
            await self._verify_sentinels()
        try:
            await self._redis.ping()
        except Exception as exc:
            problem = _misconfiguration(exc)
            if problem is not None:
                raise StoreMisconfigured(f"session store ({self.url}): {problem}") from exc
            raise StoreUnavailable(f"session store ({self.url}) unavailable at startup: {short_reason(exc)}") from exc

    async def _verify_sentinels(self) -> None:
        """Asks each Sentinel for a PONG. redis-py folds a refused Sentinel password or certificate into "no master
        found", so they are told apart here: misconfigured when no Sentinel accepted us and one refused us."""
        refused: list[str] = []
        accepted = False
        for sentinel in self._sentinel.sentinels:
            try:
                accepted = bool(await sentinel.ping()) or accepted
            except Exception as exc:
                problem = _misconfiguration(exc, _SENTINEL_HOP)
                if problem is not None:
                    refused.append(problem)
        if refused and not accepted:
            raise StoreMisconfigured(f"session store ({self.url}): {refused[0]}")
        if refused:  # the others work: serve, but say that one Sentinel is set up differently
            log.warning("session store (%s): %d Sentinel(s) refused this gateway: %s", self.url, len(refused), refused[0])

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:  # health must answer, whatever the store says
            return False

    async def memory_usage(self, session_id: str) -> int:
        """Bytes Redis uses for one session's hash (MEMORY USAGE), for capacity planning."""
        return int(await self._call("memory usage", lambda: self._redis.memory_usage(self._skey(session_id), samples=0)) or 0)

    async def close(self) -> None:
        await self._redis.aclose()
        if self._sentinel is not None:
            for s in self._sentinel.sentinels:
                await s.aclose()
