"""A redis-server of a test's own, on a free port, with the arguments an operator would give it, and a way to fill it
to its maxmemory: for what a full Redis does to the gateway and the job queue."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

import redis

BALLAST = 32 << 10  # bytes per filler key


class OwnRedis:
    """A redis-server of this test's own on a free port."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.folder, self.args, self.port, self.proc = folder, args, _free_port(), None
        self.client = redis.Redis(port=self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.exceptions.ConnectionError):
                if self.client.ping():
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.client.close()
        self.proc.kill()
        self.proc.wait()

    def fill(self) -> list[str]:
        """Writes filler keys until Redis refuses even a small one (OOM), then puts maxmemory under its use;
        returns the keys. Sizes shrink as it fills: a refused large write frees its request buffer, which Redis
        counted, and leaves room for small ones."""
        keys: list[str] = []
        for size in (BALLAST, 1 << 10, 64):
            while True:
                key = f"ballast:{len(keys)}"
                try:
                    self.client.set(key, b"x" * size)
                except redis.exceptions.OutOfMemoryError:
                    break
                keys.append(key)
        # At the very edge a step, which rewrites its session in place, may still fit; 64 KB under what is used now,
        # every write is refused, as when an operator lowers maxmemory or the sessions outgrow it.
        used = self.client.info("memory")["used_memory"]
        self.client.config_set("maxmemory", used - (64 << 10))
        return keys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


