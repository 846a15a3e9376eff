"""Publish to first frame: how long after `publish` starts a new world version's first frame reaches a client of a
gateway that was already serving the catalogue (issue 26's target: <= 10 s), with nothing restarted.

A `genie serve --registry` process serves version 1 to an open session; the benchmark publishes the same world again
as version 2 (the full publish: check, copy, check the copy, manifest, rename), opens a session on the world's name
(so it must get version 2) and times each part. The version-1 session steps again afterwards, on its version.
With --backend triton the gateway's models are on a `genie triton serve --explicit` process started beside it: the
new version's first frame includes loading its three models into that running Triton.

    python benchmarks/bench_publish.py --world worlds/demo [--backend triton]
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import base_parser, emit, setup_run

from genie.catalog import DirectoryCatalog
from genie.worlds import load_prompts
from services.gateway.api.client import GatewayClient

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_serving(address: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async with GatewayClient(address, TOKEN, timeout_s=5) as client:
                await client.list_worlds()
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def measure(world: Path, registry: DirectoryCatalog, address: str) -> dict:
    image = load_prompts(world)[0].read_bytes()
    async with GatewayClient(address, TOKEN, timeout_s=120) as client:
        old = (await client.open(image=image, seed=1, world="bench")).session
        await client.step(old.session_id, 0)
        t0 = time.perf_counter()
        entry = registry.publish(world, "bench")
        t1 = time.perf_counter()
        new = (await client.open(image=image, seed=1, world="bench")).session  # loads version 2, first frame
        t2 = time.perf_counter()
        await client.step(old.session_id, 0)  # the older version's session plays on
        after = await client.get(old.session_id)
        return {"published": entry.ref, "new_session_world": new.world, "old_session_world": after.world,
                "publish_s": round(t1 - t0, 2), "open_new_version_s": round(t2 - t1, 2),
                "publish_to_first_frame_s": round(t2 - t0, 2)}


def start_triton(tmp: Path):
    """A Triton with explicit model control on free ports (as `genie triton serve --explicit` runs it)."""
    from services.triton import TritonServer, free_ports
    from services.triton.launcher import explicit_repository

    server = TritonServer(explicit_repository(tmp / "triton"), *free_ports(3), log_path=tmp / "triton.log")
    server.start()
    server.wait_ready(timeout=120)
    return server


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=Path("worlds/demo"))
    parser.add_argument("--backend", choices=["inprocess", "triton"], default="inprocess")
    args = parser.parse_args()
    machine = setup_run(args)
    with tempfile.TemporaryDirectory() as tmp:
        registry = DirectoryCatalog(Path(tmp) / "registry")
        registry.publish(args.world, "bench")
        port = free_port()
        env = {**os.environ, "GENIE_TOKENS": f"bench:{TOKEN}"}
        triton = start_triton(Path(tmp)) if args.backend == "triton" else None
        backend = ["--backend", "triton", "--triton-url", triton.grpc_url] if triton is not None else []
        server = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", "--registry", str(registry.root), "--grpc-port", str(port),
             "--http-port", "-1", "--metrics-port", "-1", *backend], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        try:
            address = f"127.0.0.1:{port}"
            asyncio.run(wait_serving(address))
            result = asyncio.run(measure(args.world, registry, address))
        finally:
            server.terminate()
            server.wait(30)
            if triton is not None:
                triton.stop()
    emit({"bench": "publish", "backend": args.backend, "world": str(args.world), **result}, machine, args.out)


if __name__ == "__main__":
    main()
