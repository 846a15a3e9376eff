"""A full Redis, as an operator meets it: what clients are told, what is lost, how fast service comes back.

A `genie serve` process (in-process backend, Redis store) on a redis-server of its own with `maxmemory` and the
`noeviction` policy. It measures one session's record (Redis MEMORY USAGE after the history window has filled),
sets maxmemory to what Redis uses plus `--headroom-kb`, then opens and steps sessions from several clients until
`--refusals` calls were refused. Then: every session's step against the last one its client saw acknowledged
(lost steps), the status codes of the refusals, tracebacks in the gateway's log, and, after the operator's remedy
(closing half of the sessions, which works on a full Redis), how long until a refused session steps again.
Target (issue 27): 0 UNKNOWN/INTERNAL, 0 tracebacks, 0 acknowledged steps lost, service back within 5 s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import redis
from common import base_parser, emit, setup_run
from PIL import Image

from genie.worlds import load_prompts
from services.gateway.api.client import GatewayClient
from services.gateway.security.auth import new_token

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(folder: Path) -> tuple[subprocess.Popen, redis.Redis, int]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                             "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        with contextlib.suppress(redis.ConnectionError):
            client.ping()
            return proc, client, port
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def start_gateway(world: Path, redis_port: int, tokens: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    spec = ",".join(f"{name}:{token}" for name, token in tokens.items())
    cmd = [sys.executable, "-m", "services.cli", "serve", "--world", str(world), "--backend", "inprocess", "--store", "redis",
           "--redis-url", f"redis://127.0.0.1:{redis_port}/0", "--grpc-port", "0", "--http-port", "-1",
           "--metrics-port", "-1", "--tokens", spec, "--max-sessions", "100000", "--rate", "1000000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, cwd=ROOT)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"genie serve exited with {proc.wait()}; see {log}")
    return proc, json.loads(line)["grpc"]


def png_of(world: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(load_prompts(world)[0]).save(buf, format="PNG")
    return buf.getvalue()


async def run(args) -> dict:
    tokens = {f"client{i}": new_token() for i in range(args.clients)}
    png = png_of(args.world)
    with tempfile.TemporaryDirectory() as tmp:
        rproc, r, rport = start_redis(Path(tmp))
        gproc, address = start_gateway(args.world, rport, tokens, Path(tmp) / "gateway.log")
        clients = [GatewayClient(address, t, timeout_s=60) for t in tokens.values()]
        try:
            # One session's record once its history window is full: the unit for sizing maxmemory.
            probe = (await clients[0].open(image=png, steps=args.sampling_steps)).session.session_id
            for i in range(args.window_steps):
                await clients[0].step(probe, i % 4)
            record_bytes = r.memory_usage(f"genie:s:{probe}", samples=0)
            await clients[0].close(probe)
            used = r.info("memory")["used_memory"]
            r.config_set("maxmemory", used + args.headroom_kb * 1024)

            acked: dict[str, tuple[int, int]] = {}  # session -> (client index, last acknowledged step)
            codes: collections.Counter[str] = collections.Counter()
            opened, steps_ok, k = 0, 0, 0
            refused_sessions: list[str] = []
            while sum(codes.values()) < args.refusals:
                c = k % len(clients)
                k += 1
                try:
                    sid = (await clients[c].open(image=png, steps=args.sampling_steps)).session.session_id
                    acked[sid], opened = (c, 0), opened + 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
                for sid, (ci, step) in list(acked.items())[-args.step_recent:]:
                    try:
                        acked[sid] = (ci, (await clients[ci].step(sid, step % 4)).step)
                        steps_ok += 1
                    except grpc.aio.AioRpcError as exc:
                        codes[exc.code().name] += 1
                        refused_sessions.append(sid)
            full_message = ""
            with contextlib.suppress(grpc.aio.AioRpcError):
                await clients[0].open(image=png)
            try:
                await clients[0].open(image=png)
            except grpc.aio.AioRpcError as exc:
                full_message = exc.details()

            lost = 0  # reads work on a full Redis: every session must be at its last acknowledged step
            for sid, (ci, step) in acked.items():
                lost += (await clients[ci].get(sid)).step != step

            # The operator's remedy: close half of the sessions (a close works on a full Redis), then step again.
            closing = [sid for sid in acked if sid not in refused_sessions[-1:]][: len(acked) // 2]
            for sid in closing:
                await clients[acked[sid][0]].close(sid)
            freed = time.monotonic()
            sid = refused_sessions[-1] if refused_sessions else next(iter(acked))
            ci, step = acked[sid]
            back_s = None
            while time.monotonic() - freed < 30:
                try:
                    response = await clients[ci].step(sid, 1)
                    back_s = time.monotonic() - freed
                    lost += response.step != step + 1
                    break
                except grpc.aio.AioRpcError as exc:
                    codes[f"after close: {exc.code().name}"] += 1
                    await asyncio.sleep(0.05)
        finally:
            for client in clients:
                await client.close_channel()
            gproc.terminate()
            gproc.wait(timeout=30)
            rproc.kill()
            rproc.wait()
            log = (Path(tmp) / "gateway.log").read_text()
    return {
        "bench": "full_redis", "world": str(args.world), "sampling_steps": args.sampling_steps,
        "session_record_bytes": record_bytes, "headroom_kb": args.headroom_kb, "sessions_opened": opened,
        "steps_acknowledged": steps_ok, "refusals": dict(codes), "full_message": full_message,
        "internal_or_unknown": sum(n for c, n in codes.items() if c.endswith(("INTERNAL", "UNKNOWN"))),
        "tracebacks": log.count("Traceback"), "refusal_log_lines": log.count("session store refused"),
        "acknowledged_steps_lost": lost, "closed_to_free": len(closing), "service_back_s": back_s,
    }


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--world", type=Path, default=ROOT / "worlds" / "demo")
    p.add_argument("--sampling-steps", type=int, default=2)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--window-steps", type=int, default=24, help="steps of the probe session before it is measured")
    p.add_argument("--headroom-kb", type=int, default=1024, help="maxmemory = used memory + this")
    p.add_argument("--refusals", type=int, default=21, help="stop filling after this many refused calls")
    p.add_argument("--step-recent", type=int, default=4, help="each round steps the newest this many sessions")
    args = p.parse_args()
    machine = setup_run(args)
    emit(asyncio.run(run(args)), machine, args.out)


if __name__ == "__main__":
    main()
