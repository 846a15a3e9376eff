"""Gateway load: step latency p50/p99 and aggregate frames/s for N concurrent sessions through the real gRPC
gateway (a `genie serve` subprocess), against the same steps made directly on the model backend (no gateway,
no store, no gRPC); the gateway's own time split (models vs session store) from its Prometheus histograms; the
Redis memory of an idle session; and a soak: many sessions stepping for minutes with every session checked.

Each client opens one session and steps it `--steps` times, one step in flight per session (as a player
would); all clients run concurrently, so the backend batches across them. Latency is client wall time per
Step call (gRPC + gateway + store + models + PNG encode). `gateway_overhead` is 1 - model time / step time
inside the gateway (store reads/commits, state (de)serialisation, bookkeeping); `e2e_over_bare` compares the
client's median step with the median of the same concurrent steps made on the backend directly.

`--tls` measures what TLS costs instead: one gateway serving a TLS port and its opt-in plaintext port, the same
runs alternating between the two (p50 and aggregate frames/s each), plus a model-free RPC's latency on each.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from common import base_parser, emit, rounded, setup_run

from genie.media import load_image
from genie.sampling import advance, new_state
from genie.worlds import load_prompts
from services.gateway.api.client import GatewayClient
from services.gateway.security.auth import new_token
from services.gateway.security.tls import ClientTLS

ROOT = Path(__file__).resolve().parent.parent


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


class GatewayProcess:
    """`genie serve` in a subprocess, as deployed: its own Python, its own cores."""

    def __init__(self, world: Path, backend: str, store: str, triton_url: str, threads: int, tls_dir: Path | None = None,
                 redis_url: str = "redis://127.0.0.1:6379/0") -> None:
        self.token = new_token()
        args = [sys.executable, "-m", "services.cli", "serve", "--world", str(world), "--backend", backend, "--store", store,
                "--triton-url", triton_url, "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "0",
                "--tokens", f"bench:{self.token}", "--max-sessions", "100000", "--rate", "1000000", "--session-ttl", "3600"]
        if store == "redis":
            args += ["--redis-url", redis_url]
        if threads:
            args += ["--threads", str(threads)]
        if tls_dir is not None:  # TLS on the main port, a plaintext port beside it: both paths in one process
            args += ["--tls-cert", str(tls_dir / "cert.pem"), "--tls-key", str(tls_dir / "key.pem"), "--plaintext-grpc-port", "0"]
        self.tls = ClientTLS(ca=str(tls_dir / "cert.pem")) if tls_dir is not None else None
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"genie serve exited with {self.proc.wait()}")
        info = json.loads(line)
        self.address, self.metrics_port = info["grpc"], info["metrics_port"]
        self.plaintext_address = info.get("grpc_plaintext")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> float:
        """User + system CPU time the gateway process (all its threads) has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (stat fields 14, 15)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def through_gateway(gw: GatewayProcess, image: bytes, sessions: int, steps: int, num_actions: int,
                          plaintext: bool = False) -> dict:
    """One run; `plaintext`: over a TLS gateway's opt-in plaintext port instead of its TLS port."""
    before, cpu_before = scrape(gw.metrics_port), gw.cpu_seconds()
    latencies: list[float] = []
    address, tls = (gw.plaintext_address, None) if plaintext else (gw.address, gw.tls)
    async with GatewayClient(address, gw.token, timeout_s=600, tls=tls) as client:
        opened = await asyncio.gather(*[client.open(image=image, seed=i) for i in range(sessions)])
        ids = [o.session.session_id for o in opened]

        async def player(k: int, sid: str) -> None:
            for s in range(steps):
                t0 = time.perf_counter()
                await client.step(sid, (k + s) % num_actions)
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*[player(k, sid) for k, sid in enumerate(ids)])
        wall = time.perf_counter() - t0
        infos = await asyncio.gather(*[client.get(sid) for sid in ids])
        assert all(i.step == steps for i in infos), "every session must have taken every step"
        await asyncio.gather(*[client.close(sid) for sid in ids])
    after, cpu = scrape(gw.metrics_port), gw.cpu_seconds() - cpu_before
    d = lambda key: after.get(key, 0.0) - before.get(key, 0.0)  # noqa: E731
    step_s, model_s = d("genie_gateway_step_seconds_sum"), d("genie_gateway_model_seconds_sum")
    store_s = d("genie_gateway_store_seconds_sum")
    n = d("genie_gateway_step_seconds_count")
    return {
        "p50_ms": 1e3 * percentile(latencies, 50),
        "p99_ms": 1e3 * percentile(latencies, 99),
        "mean_ms": 1e3 * statistics.fmean(latencies),
        "fps_aggregate": len(latencies) / wall,
        "server_step_ms": 1e3 * step_s / n,
        "server_model_ms": 1e3 * model_s / n,
        "server_store_ms": 1e3 * store_s / n,
        "gateway_overhead": 1 - model_s / step_s,
        "commit_conflicts": d("genie_gateway_commit_conflicts_total"),
        # CPU the gateway spent per frame (open/get/close included): unlike wall time, other processes' load on a
        # shared machine hardly moves it, and a CPU-bound server's capacity in frames/s is cores / this.
        "gateway_cpu_ms_per_frame": 1e3 * cpu / len(latencies),
    }


async def bare(backend, frame: np.ndarray, sessions: int, steps: int) -> dict:
    """The same concurrent steps made on the backend directly: the floor the gateway adds to."""
    spec = backend.spec
    latencies: list[float] = []

    async def player(k: int) -> None:
        state = new_state(f"bare-{k}", torch.from_numpy(await backend.encode(frame[None])), k)
        await backend.decode_last(state)
        for s in range(steps):
            a = (k + s) % spec.num_actions
            t0 = time.perf_counter()
            tokens = await backend.next_tokens(state, a, spec.sampling)
            state = advance(state, torch.from_numpy(tokens), a, spec.window, spec.keep)
            await backend.decode_last(state)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*[player(k) for k in range(sessions)])
    wall = time.perf_counter() - t0
    return {"bare_p50_ms": 1e3 * percentile(latencies, 50), "bare_p99_ms": 1e3 * percentile(latencies, 99),
            "bare_fps_aggregate": len(latencies) / wall}


async def soak(gw: GatewayProcess, image: bytes, sessions: int, seconds: float, num_actions: int) -> dict:
    """Sessions step non-stop for `seconds`; afterwards every session must hold exactly its accepted steps."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    ok = [0] * sessions
    rss0 = gw.rss_mb()
    async with GatewayClient(gw.address, gw.token, timeout_s=600) as client:
        ids = [o.session.session_id for o in await asyncio.gather(*[client.open(image=image, seed=i) for i in range(sessions)])]
        deadline = time.monotonic() + seconds

        async def player(k: int, sid: str) -> None:
            last = 0
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    r = await client.step(sid, (k + last) % num_actions)
                except Exception as exc:  # counted, not fatal: the soak reports them
                    code = str(exc.code()) if hasattr(exc, "code") else type(exc).__name__
                    errors[code] = errors.get(code, 0) + 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if r.step != last + 1:
                    errors["step_out_of_order"] = errors.get("step_out_of_order", 0) + 1
                last = r.step
                ok[k] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*[player(k, sid) for k, sid in enumerate(ids)])
        wall = time.perf_counter() - t0
        infos = await asyncio.gather(*[client.get(sid) for sid in ids], return_exceptions=True)
        lost = sum(1 for i in infos if isinstance(i, Exception))
        kept = [(i, n) for i, n in zip(infos, ok, strict=True) if not isinstance(i, Exception)]
        mismatched = sum(1 for i, n in kept if (i.step, i.version) != (n, n))
        await asyncio.gather(*[client.close(sid) for sid in ids], return_exceptions=True)
    return {"soak_sessions": sessions, "soak_seconds": round(wall, 1), "steps": sum(ok), "fps_aggregate": sum(ok) / wall,
            "p50_ms": 1e3 * percentile(latencies, 50), "p99_ms": 1e3 * percentile(latencies, 99), "errors": errors,
            "lost_sessions": lost, "mismatched_sessions": mismatched, "min_steps_per_session": min(ok),
            "gateway_rss_mb_start": round(rss0, 1), "gateway_rss_mb_end": round(gw.rss_mb(), 1),
            "loadavg_1m_end": round(os.getloadavg()[0], 2)}


async def redis_idle_memory(gw: GatewayProcess, image: bytes, redis_url: str, count: int) -> dict:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis_url)
    used0 = (await r.info("memory"))["used_memory"]
    async with GatewayClient(gw.address, gw.token, tls=gw.tls) as client:
        ids = [o.session.session_id for o in await asyncio.gather(*[client.open(image=image, seed=i) for i in range(count)])]
        await asyncio.gather(*[client.step(sid, 0) for sid in ids])
        used1 = (await r.info("memory"))["used_memory"]
        key_bytes = await r.memory_usage(f"genie:s:{ids[0]}", samples=0)
        await asyncio.gather(*[client.close(sid) for sid in ids])
    await r.aclose()
    return {"idle_sessions": count, "redis_bytes_per_session_info": (used1 - used0) / count, "redis_key_memory_usage": key_bytes}


def make_backend(kind: str, world: Path, triton_url: str):
    if kind == "triton":
        from services.backends.triton_backend import TritonBackend

        return TritonBackend(triton_url)
    from services.backends.inprocess import InProcessBackend

    return InProcessBackend(world)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=ROOT / "worlds" / "demo")
    parser.add_argument("--backend", choices=["inprocess", "triton"], default="inprocess")
    parser.add_argument("--store", choices=["memory", "redis"], default="redis")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--sessions", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=16, help="steps per session (demo window 8: includes slides)")
    parser.add_argument("--idle-sessions", type=int, default=200, help="sessions opened to measure Redis memory (0 = skip)")
    parser.add_argument("--soak-sessions", type=int, default=64)
    parser.add_argument("--soak-seconds", type=float, default=0, help="0 = no soak")
    parser.add_argument("--triton-threads", type=int, default=0, help="torch threads per Triton model instance")
    parser.add_argument("--tls", action="store_true",
                        help="TLS cost: one gateway with a TLS port and a plaintext one, runs alternating between them")
    parser.add_argument("--tls-rounds", type=int, default=2, help="with --tls: plaintext/TLS run pairs per session count")
    args = parser.parse_args()
    if args.tls:
        tls_cost(args)
        return
    machine = setup_run(args)
    base = {"bench": "gateway", "world": args.world.name, "backend": args.backend, "store": args.store}
    if args.backend == "triton":
        base["triton_threads"] = args.triton_threads
    image = args.world.joinpath("prompts", "00.png").read_bytes() if (args.world / "prompts").exists() else None
    image = image or load_prompts(args.world)[0].read_bytes()

    triton = None
    triton_url = "127.0.0.1:8001"
    if args.backend == "triton":
        triton = start_triton(args.world, args.triton_threads)
        triton_url = triton.grpc_url
    try:
        gw = GatewayProcess(args.world, args.backend, args.store, triton_url, args.threads)
        try:
            spec_actions = len(asyncio.run(list_actions(gw)).actions)
            asyncio.run(through_gateway(gw, image, 1, 3, spec_actions))  # warm-up: model load, first slide
            rows = {n: asyncio.run(through_gateway(gw, image, n, args.steps, spec_actions)) for n in args.sessions}
            if args.store == "redis" and args.idle_sessions:
                emit(rounded({**base, "bench": "gateway_redis_memory",
                              **asyncio.run(redis_idle_memory(gw, image, args.redis_url, args.idle_sessions))}), machine, args.out)
            if args.soak_seconds:
                result = asyncio.run(soak(gw, image, args.soak_sessions, args.soak_seconds, spec_actions))
                emit(rounded({**base, "bench": "gateway_soak", **result}), machine, args.out)
        finally:
            gw.stop()
        # The bare baseline runs after the gateway is gone, so the two never share the cores.
        frame = load_image(image, *bare_hw(args.world))
        for n, row in rows.items():
            b = asyncio.run(bare_run(args.backend, args.world, triton_url, frame, n, args.steps))
            emit(rounded({**base, "sessions": n, "steps_per_session": args.steps, **row, **b,
                          "e2e_over_bare": row["p50_ms"] / b["bare_p50_ms"] - 1}), machine, args.out)
    finally:
        if triton is not None:
            triton.stop()


def self_signed(folder: Path) -> Path:
    """A throwaway self-signed certificate for 127.0.0.1 (P-256, as the openssl CLI makes it)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=genie-bench", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")], check=True, capture_output=True)
    return folder


async def rpc_latencies(gw: GatewayProcess, plaintext: bool, calls: int) -> list[float]:
    address, tls = (gw.plaintext_address, None) if plaintext else (gw.address, gw.tls)
    async with GatewayClient(address, gw.token, tls=tls) as client:
        await client.list_actions()  # connect (and handshake) outside the timing
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await client.list_actions()
            times.append(time.perf_counter() - t0)
    return times


def tls_cost(args) -> None:
    """Step p50 and aggregate frames/s over TLS and plaintext against the same gateway process, alternating the
    two (plaintext first, then TLS, `--tls-rounds` times) so that load drifting on the machine hits both alike."""
    import tempfile

    machine = setup_run(args)
    image = load_prompts(args.world)[0].read_bytes()
    with tempfile.TemporaryDirectory(prefix="genie-bench-tls-") as tmp:
        gw = GatewayProcess(args.world, args.backend, args.store, "127.0.0.1:8001", args.threads, self_signed(Path(tmp)),
                            redis_url=args.redis_url)
        try:
            actions = len(asyncio.run(list_actions(gw)).actions)
            for plaintext in (True, False):  # warm-up on both paths: model load, first slide, TLS session setup
                asyncio.run(through_gateway(gw, image, 1, 3, actions, plaintext=plaintext))
            # The TLS cost without the model's noise: a model-free RPC (ListActions) on one channel per path.
            lat = {True: [], False: []}
            for _ in range(args.tls_rounds):
                for plaintext in (True, False):
                    lat[plaintext] += asyncio.run(rpc_latencies(gw, plaintext, 100))
            plain_ms, tls_ms = (1e3 * statistics.median(lat[k]) for k in (True, False))
            emit(rounded({"bench": "gateway_tls_rpc", "rpc": "ListActions", "calls_per_path": len(lat[True]),
                          "plain_p50_ms": plain_ms, "tls_p50_ms": tls_ms, "tls_added_ms": tls_ms - plain_ms}),
                 machine, args.out)
            for n in args.sessions:
                runs: dict[bool, list[dict]] = {True: [], False: []}
                for _ in range(args.tls_rounds):
                    for plaintext in (True, False):
                        runs[plaintext].append(asyncio.run(through_gateway(gw, image, n, args.steps, actions, plaintext)))
                metrics = ("p50_ms", "p99_ms", "fps_aggregate", "gateway_cpu_ms_per_frame")
                med = {k: {m: statistics.median(r[m] for r in v) for m in metrics} for k, v in runs.items()}
                plain, tls = med[True], med[False]
                # Each TLS run against the plaintext run just before it: drift between pairs cancels out.
                pairs = list(zip(runs[True], runs[False], strict=True))
                fps_costs = sorted(1 - t["fps_aggregate"] / q["fps_aggregate"] for q, t in pairs)
                cpu_costs = sorted(t["gateway_cpu_ms_per_frame"] / q["gateway_cpu_ms_per_frame"] - 1 for q, t in pairs)
                emit(rounded({"bench": "gateway_tls", "world": args.world.name, "backend": args.backend, "store": args.store,
                              "sessions": n, "steps_per_session": args.steps, "rounds": args.tls_rounds,
                              **{f"plain_{m}": x for m, x in plain.items()}, **{f"tls_{m}": x for m, x in tls.items()},
                              "tls_cost_p50": tls["p50_ms"] / plain["p50_ms"] - 1,
                              "tls_cost_fps": 1 - tls["fps_aggregate"] / plain["fps_aggregate"],
                              "tls_cost_fps_paired_median": statistics.median(fps_costs),
                              "tls_cost_fps_paired_range": [round(fps_costs[0], 4), round(fps_costs[-1], 4)],
                              "tls_cost_cpu_per_frame_paired_median": statistics.median(cpu_costs),
                              "tls_cost_cpu_per_frame_paired_range": [round(cpu_costs[0], 4), round(cpu_costs[-1], 4)]}),
                     machine, args.out)
        finally:
            gw.stop()


def bare_hw(world: Path) -> tuple[int, int]:
    from genie.worlds import load_world_config_of

    cfg = load_world_config_of(world)
    return cfg.tokenizer.frame.height, cfg.tokenizer.frame.width


async def bare_run(kind: str, world: Path, triton_url: str, frame: np.ndarray, sessions: int, steps: int) -> dict:
    backend = make_backend(kind, world, triton_url)
    await backend.start()
    try:
        await bare(backend, frame, 1, 2)  # warm-up
        return await bare(backend, frame, sessions, steps)
    finally:
        await backend.close()


async def list_actions(gw: GatewayProcess):
    async with GatewayClient(gw.address, gw.token, tls=gw.tls) as client:
        return await client.list_actions()


def start_triton(world: Path, threads: int):
    import tempfile

    from services.triton.launcher import TritonServer, assemble_repository

    folder = Path(tempfile.mkdtemp(prefix="genie-bench-triton-"))
    repo = assemble_repository(world, folder / "repo", threads=threads) if threads else assemble_repository(world, folder / "repo")
    server = TritonServer(repo, log_path=folder / "triton.log")
    server.start()
    server.wait_ready(120)
    return server


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
