"""The play page's web app on 127.0.0.1 served from a background thread (its own asyncio loop), over an in-process
backend and a memory store: what the Chromium page test and `benchmarks/bench_page.py` drive with a real browser.
Selenium blocks its thread; the server must not."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from aiohttp import web

from genie.catalog import DirectoryCatalog
from services.backends.inprocess import InProcessBackend
from services.backends.worlds import ServedWorlds
from services.gateway.api.web import create_web_app
from services.gateway.security.auth import Authenticator
from services.gateway.sessions import Limits, SessionService
from services.gateway.stores.memory_store import MemoryStore

WAIT_S = 10


class PageServer:
    """`start()` -> the page's base URL. `stepped` lists the actions in the order the service received them."""

    def __init__(self, world_dir: Path, token: str, requests_per_second: float = 1000.0,
                 backend_options: dict | None = None, registry: Path | None = None) -> None:
        """With `registry`, the page serves that world catalogue (and `world_dir` is only where tests read prompts)."""
        self.world_dir, self.token, self.registry = world_dir, token, registry
        self.requests_per_second = requests_per_second
        self.backend_options = backend_options or {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="page-server", daemon=True)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.stepped: list[int] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        self.thread.start()
        if not self.ready.wait(120) or self.error is not None:
            raise RuntimeError(f"the page server did not start: {self.error!r}")
        return self.url

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:  # reported by start(), in the caller's thread
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        if self.registry is None:
            self.backend = InProcessBackend(self.world_dir, **self.backend_options)
            await self.backend.start()
        else:
            self.backend = ServedWorlds(catalog=DirectoryCatalog(self.registry),
                                        make=lambda entry: InProcessBackend(entry.path, **self.backend_options))
        self.service = SessionService(self.backend, MemoryStore(), Authenticator({self.token: "player"}),
                                      Limits(requests_per_second=self.requests_per_second))
        step = self.service.step

        async def recording_step(client: str, session_id: str, action: int):
            self.stepped.append(action)
            return await step(client, session_id, action)

        self.service.step = recording_step  # type: ignore[method-assign]
        self.runner = web.AppRunner(create_web_app(self.service, None if self.registry else self.world_dir))
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()  # port 0: the OS picks a free one
        self.port = self.runner.addresses[0][1]

    def call(self, coro):
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S)

    def stop(self) -> None:
        async def shutdown() -> None:
            await self.runner.cleanup()
            await self.backend.close()

        self.call(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)
        self.loop.close()
