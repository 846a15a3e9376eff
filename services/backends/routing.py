"""Session-affine routing over several replicas of a Triton model: rendezvous hashing, health, DNS discovery.

Each model (tokenizer, lam, dynamics) may be served by several Triton servers. A session's calls go to the replica
that ranks first for its id under rendezvous (highest-random-weight) hashing over the healthy replicas, so its
soft K/V cache keeps hitting there. Removing a replica moves only the sessions that ranked it first; each moves to
its second-ranked replica, where its first call misses the cache and recomputes from the tokens (same frames).

An endpoint spec is "host:port", or "dns:name:port": every A record of `name` is a replica (the pods behind a
Kubernetes headless Service), looked up again every `resolve_every_s`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

DNS_PREFIX = "dns:"


def score(key: str, endpoint: str) -> int:
    """The rendezvous weight of (key, endpoint): a stable 64-bit hash, the same in every process and run."""
    digest = hashlib.blake2b(f"{key}\x00{endpoint}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_rank(key: str, endpoints: Sequence[str]) -> list[str]:
    """`endpoints` ordered by preference for `key`: the first is its home, the rest its failover order."""
    return sorted(endpoints, key=lambda e: (score(key, e), e), reverse=True)


def parse_endpoints(spec: str) -> list[str]:
    """"a:8001, b:8001, dns:svc:8001" -> its specs; ValueError unless each is host:port or dns:name:port."""
    specs = [s.strip() for s in spec.split(",") if s.strip()]
    if not specs:
        raise ValueError(f"no Triton endpoint in {spec!r}; expected host:port[,host:port...] or dns:name:port")
    for s in specs:
        host, _, port = s.removeprefix(DNS_PREFIX).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"Triton endpoint {s!r} is not host:port or dns:name:port")
    if len(set(specs)) != len(specs):
        raise ValueError(f"Triton endpoints repeat in {spec!r}")
    return specs


@dataclass(frozen=True)
class HealthPolicy:
    """How long a failed endpoint is skipped: `down_s` after a failure, doubling while it keeps failing."""

    down_s: float = 1.0
    max_down_s: float = 30.0
    resolve_every_s: float = 10.0  # DNS specs are looked up again this often (pods come and go)


class EndpointSet:
    """The replicas of one model: the endpoints its specs name now, and which of them failed recently.

    A failed endpoint is marked down for a backoff; once that passes, the next call routed to it is its probe
    (success clears it, failure doubles the backoff). When every endpoint is down, all are tried anyway.
    """

    def __init__(self, specs: Sequence[str], policy: HealthPolicy | None = None) -> None:
        self.specs = list(specs)
        self.policy = policy or HealthPolicy()
        self._static = [s for s in self.specs if not s.startswith(DNS_PREFIX)]
        self._dns = [s.removeprefix(DNS_PREFIX) for s in self.specs if s.startswith(DNS_PREFIX)]
        self._resolved: dict[str, list[str]] = {}  # dns spec -> its endpoints at the last good lookup
        self._resolved_at = float("-inf")
        self._down: dict[str, tuple[float, float]] = {}  # endpoint -> (down until, its current backoff)

    @property
    def endpoints(self) -> list[str]:
        """Every endpoint known now (static ones, then DNS results), without duplicates."""
        out = list(self._static)
        for name in self._dns:
            out += [e for e in self._resolved.get(name, []) if e not in out]
        return out

    async def refresh(self, force: bool = False) -> list[str]:
        """Looks the DNS specs up again when due (or forced); keeps the last good answer of a failed lookup.

        Returns the endpoints that disappeared (their connections may be closed).
        """
        if not self._dns or (not force and time.monotonic() - self._resolved_at < self.policy.resolve_every_s):
            return []
        self._resolved_at = time.monotonic()  # first: concurrent calls meanwhile do not start lookups of their own
        before = set(self.endpoints)
        loop = asyncio.get_running_loop()
        for name in self._dns:
            host, _, port = name.rpartition(":")
            try:
                infos = await loop.getaddrinfo(host, int(port), family=socket.AF_INET, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("Triton endpoints: cannot resolve %s (keeping %s): %s", host, self._resolved.get(name), exc)
                continue
            self._resolved[name] = sorted({f"{info[4][0]}:{port}" for info in infos})
        gone = before - set(self.endpoints)
        for e in gone:
            self._down.pop(e, None)
        return sorted(gone)

    def healthy(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        return [e for e in self.endpoints if self._down.get(e, (0.0, 0.0))[0] <= now]

    def route(self, key: str) -> list[str]:
        """The endpoints to try for `key`, in order: healthy ones by rendezvous rank, then the down ones by rank."""
        healthy = set(self.healthy())
        ranked = rendezvous_rank(key, self.endpoints)
        return [e for e in ranked if e in healthy] + [e for e in ranked if e not in healthy]

    def mark_down(self, endpoint: str) -> None:
        """Skips `endpoint` for a backoff: down_s, doubled each time its probe fails (up to max_down_s).

        Failures while it is already down (the other calls that were in flight when it went) change nothing, so a
        burst of them does not stretch the backoff."""
        now = time.monotonic()
        until, backoff = self._down.get(endpoint, (0.0, 0.0))
        if until > now:
            return
        backoff = min(self.policy.max_down_s, backoff * 2 if backoff else self.policy.down_s)
        self._down[endpoint] = (now + backoff, backoff)

    def mark_up(self, endpoint: str) -> None:
        self._down.pop(endpoint, None)
