"""ServedWorlds (services/backends/worlds.py): versions load once on first use, and the models budget is kept."""

from __future__ import annotations

import asyncio
import time

import pytest

from genie.catalog import DirectoryCatalog
from services.backends.inprocess import InProcessBackend
from services.backends.worlds import ModelsBudgetExceeded, ServedWorlds, weights_bytes


@pytest.fixture
def catalog(trained_world_dir, tmp_path) -> DirectoryCatalog:
    catalog = DirectoryCatalog(tmp_path / "registry")
    catalog.publish(trained_world_dir, "tiny")
    catalog.publish(trained_world_dir, "tiny")
    return catalog


def _served(catalog: DirectoryCatalog, budget: int, made: list) -> ServedWorlds:
    def make(entry):
        made.append(entry.ref)
        return InProcessBackend(entry.path)

    return ServedWorlds(catalog=catalog, make=make, budget_bytes=budget)


async def test_concurrent_first_calls_share_one_load(catalog):
    made: list[str] = []
    worlds = _served(catalog, 0, made)
    try:
        specs = await asyncio.gather(*(worlds.spec("tiny@1") for _ in range(8)))
        assert made == ["tiny@1"] and len({id(s) for s in specs}) == 1
    finally:
        await worlds.close()


async def test_a_busy_version_is_never_unloaded_and_the_load_succeeds_once_it_is_idle(catalog, trained_world_dir):
    """Over the budget with every loaded version in use: RESOURCE_EXHAUSTED-worthy refusal, nothing unloaded; once
    the busy one is released, the same load succeeds at once."""
    made: list[str] = []
    worlds = _served(catalog, weights_bytes(trained_world_dir) * 3 // 2, made)
    try:
        async with worlds.use("tiny@1") as busy:
            with pytest.raises(ModelsBudgetExceeded, match="busy"):
                await worlds.spec("tiny@2")
            assert set(worlds.loaded()) == {"tiny@1"} and busy.spec is not None
        t0 = time.monotonic()
        await worlds.spec("tiny@2")
        assert set(worlds.loaded()) == {"tiny@2"} and time.monotonic() - t0 < 5
        assert sum(worlds.loaded().values()) <= worlds.budget_bytes
    finally:
        await worlds.close()
