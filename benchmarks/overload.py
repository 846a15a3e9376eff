"""Overload shedding: step latency of the gateway at twice its saturating load, with and without admission.

Three `genie serve` phases on the in-process backend (memory store, one torch thread):
  1. unloaded: one session stepping alone -> step p50/p99 (the reference);
  2. saturation: `--closed-sessions` sessions stepping back to back -> the served steps/s, X;
  3. 2x: steps arriving open-loop (Poisson) at 2X/s over a pool of sessions, on a gateway with admission
     (`--max-in-flight`, `--max-queue`, queue timeout and step deadline set from the unloaded p50 unless given)
     and on one without (`--max-in-flight 0`) -> p99 of the served steps, how many were refused, and how fast
     each refusal came back.
Target (issue 16): served p99 at 2x <= 2x the unloaded p99; every refused step refused within 100 ms.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from common import base_parser, emit, setup_run

from genie.worlds import load_prompts
from services.gateway.api.client import GatewayClient
from services.gateway.security.auth import new_token

ROOT = Path(__file__).resolve().parent.parent


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)) * 1000, 1) if xs else None  # ms


class Serve:
    def __init__(self, world: Path, sampling_threads: int, extra: list[str]) -> None:
        self.token = new_token()
        cmd = [sys.executable, "-m", "services.cli", "serve", "--world", str(world), "--backend", "inprocess", "--store", "memory",
               "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1", "--tokens", f"bench:{self.token}",
               "--max-sessions", "100000", "--rate", "1000000", "--threads", str(sampling_threads), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"genie serve exited with {self.proc.wait()}")
        self.address = json.loads(line)["grpc"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def open_sessions(client: GatewayClient, png: bytes, n: int, steps: int) -> list[str]:
    return [(await client.open(image=png, seed=i, steps=steps)).session.session_id for i in range(n)]


async def unloaded(client: GatewayClient, sid: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await client.step(sid, i % 4)
        out.append(time.perf_counter() - t0)
    return out[3:]  # warm-up


async def closed_loop(client: GatewayClient, sids: list[str], seconds: float) -> float:
    done, stop = 0, time.monotonic() + seconds

    async def run(sid: str) -> None:
        nonlocal done
        while time.monotonic() < stop:
            await client.step(sid, done % 4)
            done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(run(s) for s in sids))
    return done / (time.monotonic() - t0)


async def open_loop(client: GatewayClient, sids: list[str], rate: float, seconds: float) -> dict:
    free, served, refused, codes, backlog = list(sids), [], [], {}, 0
    tasks = []

    async def one(sid: str) -> None:
        t0 = time.perf_counter()
        try:
            await client.step(sid, random.randrange(4))
            served.append(time.perf_counter() - t0)
        except grpc.aio.AioRpcError as exc:
            refused.append(time.perf_counter() - t0)
            codes.setdefault(exc.code().name, []).append(refused[-1])
        finally:
            free.append(sid)

    rng = random.Random(0)
    t_end = time.monotonic() + seconds
    next_at = time.monotonic()
    while next_at < t_end:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        next_at += rng.expovariate(rate)
        if not free:
            backlog += 1  # every session has a step in flight: the client itself could not send this one
            continue
        tasks.append(asyncio.create_task(one(free.pop(rng.randrange(len(free))))))
    await asyncio.gather(*tasks)
    return {"offered_per_s": round(rate, 2), "sent": len(tasks), "served": len(served), "refused": len(refused),
            "codes": {c: len(v) for c, v in codes.items()}, "refused_p99_ms_by_code": {c: pct(v, 99) for c, v in codes.items()},
            "client_backlog": backlog, "served_p50_ms": pct(served, 50), "served_p99_ms": pct(served, 99),
            "refused_p99_ms": pct(refused, 99), "refused_max_ms": round(max(refused) * 1000, 1) if refused else None,
            "served_per_s": round(len(served) / seconds, 2)}


async def bench(args) -> dict:
    png = load_prompts(args.world)[0].read_bytes()
    base = Serve(args.world, args.threads or 1, ["--max-in-flight", "0"])
    try:
        async with GatewayClient(base.address, base.token) as c:
            sids = await open_sessions(c, png, max(args.pool, args.closed_sessions), args.sampling_steps)
            lat = await unloaded(c, sids[0], args.unloaded_steps)
            x = await closed_loop(c, sids[: args.closed_sessions], args.seconds)
            p50 = float(np.percentile(lat, 50))
            unbounded = await open_loop(c, sids[: args.pool], 2 * x, args.seconds)
    finally:
        base.stop()
    wait = args.queue_timeout or round(0.5 * p50, 4)
    deadline = args.step_deadline or round(0.75 * p50, 4)
    admission = ["--max-in-flight", str(args.max_in_flight), "--max-queue", str(args.max_queue), "--queue-timeout", str(wait),
                 "--step-deadline", str(deadline)]
    shed = Serve(args.world, args.threads or 1, admission)
    try:
        async with GatewayClient(shed.address, shed.token) as c:
            sids = await open_sessions(c, png, args.pool, args.sampling_steps)
            await unloaded(c, sids[0], 5)  # warm-up
            bounded = await open_loop(c, sids, 2 * x, args.seconds)
    finally:
        shed.stop()
    ref = pct(lat, 99)
    return {"bench": "overload", "world": args.world.name, "sampling_steps": args.sampling_steps,
            "unloaded_p50_ms": pct(lat, 50), "unloaded_p99_ms": ref, "saturated_steps_per_s": round(x, 2),
            "admission": {"max_in_flight": args.max_in_flight, "max_queue": args.max_queue, "queue_timeout_s": wait,
                          "step_deadline_s": deadline},
            "at_2x_with_admission": bounded, "at_2x_without_admission": unbounded,
            "served_p99_over_unloaded_p99": round(bounded["served_p99_ms"] / ref, 2) if bounded["served_p99_ms"] else None}


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--world", type=Path, default=ROOT / "worlds" / "demo")
    p.add_argument("--sampling-steps", type=int, default=4)
    p.add_argument("--unloaded-steps", type=int, default=60)
    p.add_argument("--closed-sessions", type=int, default=8)
    p.add_argument("--pool", type=int, default=64, help="sessions the open-loop arrivals are spread over")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the saturation and of each 2x phase")
    p.add_argument("--max-in-flight", type=int, default=2)
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--queue-timeout", type=float, default=0.0, help="0 = half the unloaded p50")
    p.add_argument("--step-deadline", type=float, default=0.0, help="0 = three quarters of the unloaded p50")
    args = p.parse_args()
    machine = setup_run(args)
    emit(asyncio.run(bench(args)), machine, args.out)


if __name__ == "__main__":
    main()
