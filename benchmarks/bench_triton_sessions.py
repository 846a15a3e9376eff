"""Concurrent play sessions against the Triton model services, through the TritonBackend the gateway uses.

N sessions step as fast as they can (or at `--fps`), sharded over P client processes (each one a "gateway
process": its own TritonBackend, its own event loop), against one or more Triton servers (`--triton-url a,b`:
session-affine routing over replicas), or against one this script starts over `--world`. A step is what the
gateway does for a Step call: next_tokens (dynamics), then decode_last (tokenizer). Reports per session frames/s
(p50 and p10 over sessions: the slow tail is what a player notices), aggregate frames/s, step latency p50/p99,
and from Triton's statistics the mean batch its dynamics and tokenizer executions ran (inferences / executions,
summed over the servers). One JSON row per session count (benchmarks/common.py emit).

CPU, small:   python benchmarks/bench_triton_sessions.py --world worlds/demo --sessions 1 8 32
GPU, later:   genie triton serve --device gpu ... &  then
              python benchmarks/bench_triton_sessions.py --triton-url 127.0.0.1:8001 --sessions 512 --processes 8
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import base_parser, emit, rounded, setup_run

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Shard:
    """What one client process runs: its sessions, against which servers, until when."""

    url: str
    first: int  # session index of its first session (ids and seeds are global)
    sessions: int
    steps: int  # measured steps per session
    warmup: int  # unmeasured first steps (cache fill, connection setup)
    fps: float  # target frames/s per session; 0 = as fast as possible
    start_at: float  # time.time() at which every process starts stepping together
    prompt: str  # a PNG of the world's frame size


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


async def _run_shard(shard: Shard) -> tuple[list[dict], dict[str, float]]:
    import torch

    from genie.media import load_image
    from genie.sampling import advance, new_state
    from services.backends.triton_backend import TritonBackend

    backend = TritonBackend(shard.url, timeout_s=120.0)
    await backend.start()
    spec = backend.spec
    frame = load_image(Path(shard.prompt), spec.height, spec.width)
    prompt_tokens = torch.from_numpy(await backend.encode(frame[None]))

    async def session(k: int) -> dict:
        state = new_state(f"bench-{k}", prompt_tokens, k)
        gen = torch.Generator().manual_seed(k)
        latencies = []
        period = 1.0 / shard.fps if shard.fps else 0.0
        await asyncio.sleep(max(0.0, shard.start_at - time.time()))
        next_tick = t_first = time.perf_counter()  # the measured window starts after the warm-up steps
        for i in range(shard.warmup + shard.steps):
            if period:
                await asyncio.sleep(max(0.0, next_tick - time.perf_counter()))
                next_tick += period
            action = int(torch.randint(0, spec.num_actions, (1,), generator=gen))
            t0 = time.perf_counter()
            tokens = await backend.next_tokens(state, action, spec.sampling)
            state = advance(state, torch.from_numpy(tokens), action, spec.window, spec.keep)
            await backend.decode_last(state)
            t1 = time.perf_counter()
            if i == shard.warmup - 1:
                t_first = t1
            if i >= shard.warmup:
                latencies.append(t1 - t0)
        return {"latencies": latencies, "seconds": t1 - t_first}

    try:
        results = list(await asyncio.gather(*(session(shard.first + i) for i in range(shard.sessions))))
        from services.triton import protocol as P

        routed = {e: backend.metrics.value("calls", P.DYNAMICS, e) for e in backend.endpoints[P.DYNAMICS].endpoints}
        return results, routed
    finally:
        await backend.close()


def run_shard(shard: Shard) -> tuple[list[dict], dict[str, float]]:
    """A client process: one TritonBackend and its sessions (picklable entry point for the process pool)."""
    import torch

    torch.set_num_threads(1)
    return asyncio.run(_run_shard(shard))


async def _batch_stats(url: str) -> dict[str, tuple[int, int]]:
    """{model: (inferences, executions)} summed over every endpoint of `url`."""
    from services.backends.triton_backend import TritonBackend
    from services.triton import protocol as P

    backend = TritonBackend(url)
    out = {}
    try:
        for model in (P.DYNAMICS, P.TOKENIZER):
            eps = backend.endpoints[model]
            await eps.refresh(force=True)
            inf = exe = 0
            for endpoint in eps.endpoints:
                stats = (await backend.statistics(model, url=endpoint))["model_stats"][0]
                inf, exe = inf + int(stats.get("inference_count", 0)), exe + int(stats.get("execution_count", 0))
            out[model] = (inf, exe)
    finally:
        await backend.close()
    return out


def measure(url: str, sessions: int, processes: int, args) -> dict:
    processes = max(1, min(processes, sessions))
    per = [sessions // processes + (1 if p < sessions % processes else 0) for p in range(processes)]
    start_at = time.time() + args.setup_s
    shards, first = [], 0
    for n in per:
        shards.append(Shard(url, first, n, args.steps, args.warmup, args.fps, start_at, args.prompt))
        first += n
    before = asyncio.run(_batch_stats(url))
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        done = list(pool.map(run_shard, shards))
    results = [r for sessions_of_shard, _ in done for r in sessions_of_shard]
    routed: dict[str, float] = {}  # dynamics calls per Triton endpoint (session-affine routing), all shards
    for _, counts in done:
        for endpoint, n in counts.items():
            routed[endpoint] = routed.get(endpoint, 0) + n
    after = asyncio.run(_batch_stats(url))
    fps = [args.steps / r["seconds"] for r in results]
    latencies = [x for r in results for x in r["latencies"]]
    row = {
        "bench": "triton_sessions", "sessions": sessions, "processes": processes, "steps": args.steps,
        "target_fps": args.fps, "servers": url,
        "fps_p50": percentile(fps, 50), "fps_p10": percentile(fps, 10),
        "aggregate_fps": sum(fps),  # every session runs through the whole window, so per-session rates add up
        "step_ms_p50": 1000 * percentile(latencies, 50), "step_ms_p99": 1000 * percentile(latencies, 99),
        "dynamics_calls_per_endpoint": routed,
    }
    row["loadavg_1m"] = os.getloadavg()[0]  # this 2-core machine is shared: how busy it was at the row's end
    for model, (inf1, exe1) in after.items():
        inf0, exe0 = before[model]
        row[f"{model}_mean_batch"] = (inf1 - inf0) / (exe1 - exe0) if exe1 > exe0 else float("nan")
    return rounded(row, 2)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--triton-url", default="", help="Triton gRPC address(es) as the gateway takes them "
                        "(a,b or dns:name:port); empty: start a tritonserver over --world here")
    parser.add_argument("--world", type=Path, default=ROOT / "worlds" / "demo")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--processes", type=int, default=1, help="client processes the sessions are spread over")
    parser.add_argument("--steps", type=int, default=16, help="measured steps per session")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured first steps per session")
    parser.add_argument("--fps", type=float, default=0.0, help="target frames/s per session (0: as fast as possible)")
    parser.add_argument("--setup-s", type=float, default=5.0, help="seconds the client processes get to connect")
    parser.add_argument("--prompt", default="", help="prompt image (default: the world's first prompt)")
    parser.add_argument("--triton-threads", type=int, default=1, help="torch threads per model (a local server)")
    parser.add_argument("--device", default="cpu", help="cpu, gpu or auto (a local server)")
    parser.add_argument("--replicas", type=int, default=1, help="local servers over the same repository (routing)")
    args = parser.parse_args()
    machine = setup_run(args)
    from genie.worlds import load_prompts

    args.prompt = args.prompt or str(load_prompts(args.world)[0])
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        servers = []
        local = None
        if not args.triton_url:
            from services.triton import TritonServer, assemble_repository, free_ports
            from services.triton.launcher import resolve_placement

            repo = assemble_repository(args.world, Path(tmp), threads=args.triton_threads,
                                       placement=resolve_placement(args.device))
            local = {"device": repo.device, "threads": args.triton_threads, "replicas": args.replicas}
            for k in range(args.replicas):
                servers.append(TritonServer(repo, *free_ports(3), log_path=Path(tmp) / f"triton-{k}.log"))
                servers[-1].start()
            for server in servers:
                server.wait_ready(timeout=300)
            args.triton_url = ",".join(server.grpc_url for server in servers)
        try:
            for n in args.sessions:
                row = measure(args.triton_url, n, args.processes, args)
                row["local_server"] = local
                emit(row, machine, args.out)
                print(f"# {n} sessions: {row['fps_p50']:.1f} frames/s per session (p50), "
                      f"{row['aggregate_fps']:.1f} in all", flush=True)
        finally:
            for server in servers:
                server.stop()


if __name__ == "__main__":
    main()
