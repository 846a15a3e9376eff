"""The chaos soak: two gateway processes on a Sentinel-backed Redis and one tritonserver, N sessions stepping
from clients that retry retryable codes on the other gateway, while the harness kill -9s a gateway, the Redis
master and the Triton server in turn (each restarted the way a supervisor would). It counts what the issue
asks for: acknowledged steps lost, sessions corrupted, duplicate step numbers, and how long each fault took to
heal. Used by `benchmarks/chaos.py` (the long soak) and `tests/services/gateway/test_chaos.py` (a short one).

Heal time of a fault: from the kill until every session has had a step acknowledged that it started after the
kill (so it covers detection, failover or restart, and the clients' backoff).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from harness.redis_ha import RedisHA
from services.gateway.api.client import GatewayClient, step_exactly_once

TOKEN = "chaos-token-0123456789abcdef"
REPO = Path(__file__).resolve().parents[2]
KINDS = ("gateway", "redis", "triton")


@dataclass(frozen=True)
class ChaosConfig:
    world: Path
    root: Path  # logs and data of every process
    sessions: int = 64
    duration_s: float = 600.0
    kills: int = 3  # of each kind
    think_s: float = 0.2  # a session's pause between steps (a player, not a load generator)
    sampling_steps: int = 2  # MaskGIT steps per frame: keeps the CPU soak light
    wait_replicas: int = 1  # Redis WAIT: a step is acknowledged once a replica has it
    wait_ms: int = 500
    restart_delay_s: float = 1.0  # a supervisor's pause before it restarts a killed process
    attempts: int = 400  # per step, across both gateways, with backoff up to 1 s

    def __post_init__(self) -> None:
        if self.sessions < 1 or self.duration_s <= 0 or self.kills < 0:
            raise ValueError(f"need sessions >= 1, duration > 0, kills >= 0; got {self.sessions}, {self.duration_s}, {self.kills}")


@dataclass
class ChaosResult:
    sessions: int
    duration_s: float
    steps_acked: int = 0
    steps_per_s: float = 0.0
    lost: int = 0  # acknowledged steps the store no longer has
    corrupted: int = 0  # sessions gone, unreadable, or whose history differs from what the client was told
    duplicates: int = 0  # step numbers acknowledged twice, or a step applied twice
    responses_lost: int = 0  # steps that committed while their answer died with a gateway (found by the retry)
    gave_up: int = 0  # steps that failed after every attempt
    errors: dict[str, int] = field(default_factory=dict)  # retryable failures the clients rode through, by code
    faults: dict[str, list[float]] = field(default_factory=dict)  # kind -> heal seconds of each kill
    heal: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> {p50, max}

    def to_dict(self) -> dict:
        return asdict(self)


class Cluster:
    """The processes under test: RedisHA, one tritonserver, two `genie serve` gateways."""

    def __init__(self, cfg: ChaosConfig) -> None:
        self.cfg = cfg
        self.ha = RedisHA(cfg.root / "redis", replicas=1, sentinels=3)
        self.triton = None
        self.ports: list[int] = []
        self.gateways: list[subprocess.Popen | None] = [None, None]

    def start(self) -> None:
        from services.triton import TritonServer, assemble_repository, free_ports

        (self.cfg.root / "redis").mkdir(parents=True, exist_ok=True)
        self.ha.start()
        repository = assemble_repository(self.cfg.world, self.cfg.root / "triton", threads=1)
        self.triton = TritonServer(repository, *free_ports(3), log_path=self.cfg.root / "triton.log")
        self.start_triton()
        self.ports = free_ports(2)
        for i in range(2):
            self.start_gateway(i)

    def start_triton(self, tries: int = 3) -> None:
        """(Re)starts tritonserver; on a loaded machine a model stub occasionally fails to come up, so retry."""
        for attempt in range(tries):
            self.triton.start()
            try:
                self.triton.wait_ready(timeout=180)
                return
            except RuntimeError:
                self.triton.kill()
                if attempt == tries - 1:
                    raise
                time.sleep(1.0)

    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def start_gateway(self, i: int) -> None:
        c = self.cfg
        cmd = [sys.executable, "-m", "services.cli", "serve", "--world", str(c.world), "--backend", "triton",
               "--triton-url", self.triton.grpc_url, "--store", "redis", "--redis-url", self.ha.sentinel_url(),
               "--redis-wait-replicas", str(c.wait_replicas), "--redis-wait-ms", str(c.wait_ms),
               "--grpc-port", str(self.ports[i]), "--http-port", "-1", "--metrics-port", "-1", "--tokens", f"chaos:{TOKEN}",
               "--max-sessions", str(2 * c.sessions + 8), "--rate", "1000000"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        with open(c.root / f"gateway-{i}.log", "ab") as log:
            self.gateways[i] = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def kill_gateway(self, i: int) -> None:
        proc = self.gateways[i]
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def fault(self, kind: str, n: int) -> None:
        """kill -9 one process of `kind`, then bring it (or its replacement) back; blocking."""
        if kind == "gateway":
            i = n % 2
            self.kill_gateway(i)
            time.sleep(self.cfg.restart_delay_s)
            self.start_gateway(i)
        elif kind == "redis":
            old = self.ha.kill_master()
            self.ha.wait_failover(old)
            time.sleep(self.cfg.restart_delay_s)
            self.ha.restart(old)  # back as a replica of the promoted one: the next kill has a replica to promote
        else:
            self.triton.kill()
            time.sleep(self.cfg.restart_delay_s)
            self.start_triton()

    def stop(self) -> None:
        for i in range(2):
            self.kill_gateway(i)
        if self.triton is not None:
            self.triton.stop()
        self.ha.stop()


class Soak:
    """Clients, faults and the final check, in one event loop."""

    def __init__(self, cfg: ChaosConfig, cluster: Cluster) -> None:
        self.cfg, self.cluster = cfg, cluster
        self.acks: dict[str, list[tuple[int, int, float, float]]] = {}  # sid -> (step, action, started, acked)
        self.last_step: dict[str, int] = {}
        self.result = ChaosResult(cfg.sessions, cfg.duration_s)
        self.errors: Counter = Counter()
        self.kills: list[tuple[str, float]] = []

    async def run(self) -> ChaosResult:
        clients = [GatewayClient(a, TOKEN, timeout_s=10.0) for a in self.cluster.addresses()]
        try:
            await self._wait_ready(clients)
            sids = await self._open(clients)
            stop = asyncio.Event()
            players = [asyncio.create_task(self._player(clients, sid, k, stop)) for k, sid in enumerate(sids)]
            t0 = time.monotonic()
            await self._faults(t0)
            await asyncio.sleep(max(0.0, t0 + self.cfg.duration_s - time.monotonic()))
            stop.set()
            await asyncio.gather(*players)
            elapsed = time.monotonic() - t0
            await self._check(clients, sids)
        finally:
            for c in clients:
                await c.close_channel()
        r = self.result
        r.steps_acked = sum(len(v) for v in self.acks.values())
        r.steps_per_s = round(r.steps_acked / elapsed, 2)
        r.errors = dict(self.errors)
        self._heal()
        return r

    async def _wait_ready(self, clients: list[GatewayClient], timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        for c in clients:
            while True:
                try:
                    await c.list_actions()
                    break
                except grpc.aio.AioRpcError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)

    async def _open(self, clients: list[GatewayClient]) -> list[str]:
        from genie.worlds import load_prompts

        png = load_prompts(self.cfg.world)[0].read_bytes()
        sids = []
        for k in range(self.cfg.sessions):
            r = await clients[k % 2].open(image=png, seed=k, steps=self.cfg.sampling_steps)
            sids.append(r.session.session_id)
            self.acks[sids[-1]], self.last_step[sids[-1]] = [], 0
        return sids

    async def _player(self, clients, sid: str, k: int, stop: asyncio.Event) -> None:
        order = clients[k % 2:] + clients[: k % 2]  # a home gateway, the other one on failure
        n = 0
        while not stop.is_set():
            action = (n * 7 + k) % 4
            n += 1
            started, step = time.monotonic(), self.last_step[sid]
            try:
                response, new = await step_exactly_once(order, sid, action, step, attempts=self.cfg.attempts,
                                                        on_retry=self._count_error)
            except grpc.aio.AioRpcError as exc:
                self.result.gave_up += 1
                self.errors[f"gave up: {exc.code().name}"] += 1
                continue
            if new != step + 1:  # the store jumped (a step applied twice) or went back (an acknowledged step lost)
                if new > step + 1:
                    self.result.duplicates += new - step - 1
                else:
                    self.result.lost += step + 1 - new
            if response is None:
                self.result.responses_lost += 1
            self.acks[sid].append((new, action, started, time.monotonic()))
            self.last_step[sid] = new
            await asyncio.sleep(self.cfg.think_s)

    def _count_error(self, code: grpc.StatusCode) -> None:
        self.errors[code.name] += 1

    async def _faults(self, t0: float) -> None:
        """Schedules kills evenly between 10% and 80% of the soak: gateway, redis, triton, gateway, ..."""
        plan = [KINDS[i % 3] for i in range(3 * self.cfg.kills)]
        loop = asyncio.get_running_loop()

        async def run() -> None:
            for i, kind in enumerate(plan):
                at = t0 + self.cfg.duration_s * (0.1 + 0.7 * i / max(1, len(plan)))
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                self.kills.append((kind, time.monotonic()))
                await loop.run_in_executor(None, self.cluster.fault, kind, i // 3)

        self._fault_task = asyncio.create_task(run())

    async def _check(self, clients, sids: list[str]) -> None:
        await asyncio.wait_for(self._fault_task, 300)  # every fault has been restarted before the final check
        for sid in sids:
            acked = self.acks[sid]
            try:
                info = await _get(clients, sid)
            except grpc.aio.AioRpcError:
                self.result.corrupted += 1
                continue
            steps = [s for s, *_ in acked]
            if len(set(steps)) != len(steps):
                self.result.duplicates += len(steps) - len(set(steps))
            last = self.last_step[sid]
            if info.step < last:
                self.result.lost += last - info.step
            window = list(info.actions)[1:]
            expected = [a for _, a, *_ in acked][-len(window):] if window else []
            if info.step != info.version or info.step > last or window != expected:
                self.result.corrupted += 1

    def _heal(self) -> None:
        r = self.result
        for kind, at in self.kills:
            heals = []
            for acked in self.acks.values():
                after = [done for _, _, started, done in acked if started >= at]
                heals.append(min(after) - at if after else float("inf"))
            r.faults.setdefault(kind, []).append(round(max(heals), 2))
        for kind, heals in r.faults.items():
            r.heal[kind] = {"p50": round(statistics.median(heals), 2), "max": round(max(heals), 2)}


async def _get(clients, sid: str, attempts: int = 60):
    for attempt in range(attempts):
        try:
            return await clients[attempt % len(clients)].get(sid)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND or attempt == attempts - 1:
                raise
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


async def run_chaos(cfg: ChaosConfig) -> ChaosResult:
    """Starts the cluster, soaks it with faults, checks every session, stops everything."""
    cluster = Cluster(cfg)
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, cluster.start)
        return await Soak(cfg, cluster).run()
    finally:
        await loop.run_in_executor(None, cluster.stop)
