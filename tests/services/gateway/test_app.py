"""The gateway's lifecycle: stop() ends whatever part of the shutdown hangs, and closes every other part."""

from __future__ import annotations

import asyncio
import logging
import time

from services.backends.inprocess import InProcessBackend
from services.gateway.api.client import GatewayClient
from services.gateway.app import Gateway, GatewayConfig
from services.gateway.stores.memory_store import MemoryStore

ALICE = "alice-token-0123456789"


class _HangingBackend(InProcessBackend):
    """A backend whose close never returns (as a Triton or Redis peer that never answers a close)."""

    async def close(self) -> None:
        await asyncio.Event().wait()


class _RecordingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    async def close(self) -> None:
        self.closed = True
        await super().close()


async def test_stop_ends_when_a_part_hangs_names_it_and_closes_the_rest(trained_world_dir, caplog):
    cfg = GatewayConfig(world=str(trained_world_dir), grpc_port=0, http_port=0, metrics_port=0, tokens=f"alice:{ALICE}")
    store = _RecordingStore()
    gw = Gateway(cfg, backend=_HangingBackend(trained_world_dir), store=store)
    await gw.start()
    async with GatewayClient(gw.grpc_address, ALICE) as alice:  # serving: the stop below is from a live gateway
        assert (await alice.list_actions()).actions
    with caplog.at_level(logging.ERROR, logger="services.gateway.app"):
        started = time.monotonic()
        await gw.stop(part_timeout_s=0.5)
        took = time.monotonic() - started
    assert took < 10, f"stop took {took:.1f} s with one part hanging"
    assert "the model backend did not close within" in caplog.text
    assert store.closed, "the part after the hanging one was not closed"
    assert "gRPC server" not in caplog.text and "web page" not in caplog.text  # the parts that closed are not blamed
