"""A gateway serving a world catalogue over real gRPC: sessions choose a world and stay pinned to its version while
newer versions are published, versions load on first use and idle ones unload under the models budget."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from genie.catalog import DirectoryCatalog
from genie.worlds import load_prompts
from services.backends.worlds import weights_bytes
from services.gateway.api.client import GatewayClient, frame_array
from services.gateway.app import Gateway, GatewayConfig
from services.gateway.sessions import Limits
from services.gateway.stores.memory_store import MemoryStore

ALICE = "alice-token-0123456789"
ACTIONS = [1, 3, 0, 2, 1, 1]


def _changed_world(world: Path, to: Path) -> Path:
    """A copy of `world` whose dynamics weights differ: another version of it, with other frames."""
    shutil.copytree(world, to)
    path = to / "dynamics" / "model.safetensors"
    weights = load_file(path)
    save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in weights.items()}, path)
    return to


@pytest.fixture
def registry(trained_world_dir, tmp_path) -> DirectoryCatalog:
    catalog = DirectoryCatalog(tmp_path / "registry")
    catalog.publish(trained_world_dir, "tiny")
    return catalog


async def _gateway(catalog: DirectoryCatalog, **kw) -> Gateway:
    cfg = GatewayConfig(registry=str(catalog.root), grpc_port=0, http_port=-1, metrics_port=-1,
                        tokens=f"alice:{ALICE}", limits=Limits(max_sessions_per_client=32, requests_per_second=10_000), **kw)
    gw = Gateway(cfg, store=MemoryStore())
    await gw.start()
    return gw


def _prompt(world: Path) -> bytes:
    return load_prompts(world)[0].read_bytes()


async def _play(client: GatewayClient, session_id: str, actions: list[int]) -> list[np.ndarray]:
    return [frame_array((await client.step(session_id, a)).frame) for a in actions]


async def test_sessions_stay_on_their_version_while_a_new_one_is_published(registry, trained_world_dir, tmp_path):
    gw = await _gateway(registry)
    try:
        async with GatewayClient(gw.grpc_address, ALICE) as alice:
            image = _prompt(trained_world_dir)
            a = (await alice.open(image=image, seed=5)).session  # the only world: the default
            b = (await alice.open(image=image, seed=5, world="tiny")).session
            v1 = registry.resolve("tiny", 1)
            assert (a.world, b.world, a.world_digest) == ("tiny@1", "tiny@1", v1.digest)
            before = await _play(alice, a.session_id, ACTIONS[:3])

            v2 = registry.publish(_changed_world(trained_world_dir, tmp_path / "v2"), "tiny")  # no restart
            assert v2.digest != v1.digest
            listed = await alice.list_worlds()
            assert [(w.ref, w.digest) for w in listed.worlds] == [("tiny@1", v1.digest), ("tiny@2", v2.digest)]
            assert listed.catalogue

            after = await _play(alice, a.session_id, ACTIONS[3:])
            undisturbed = await _play(alice, b.session_id, ACTIONS)  # opened before, stepped only after the publish
            for x, y in zip(before + after, undisturbed, strict=True):
                np.testing.assert_array_equal(x, y)  # version 1's frames, bit for bit

            c = (await alice.open(image=image, seed=5, world="tiny")).session  # new sessions: the newest version
            assert (c.world, c.world_digest) == ("tiny@2", v2.digest)
            newer = await _play(alice, c.session_id, ACTIONS)
            assert any(not np.array_equal(x, y) for x, y in zip(newer, undisturbed, strict=True))
            assert (await alice.get(a.session_id)).world == "tiny@1"

            pinned = (await alice.open(image=image, seed=5, world="tiny@1")).session
            assert pinned.world == "tiny@1"
            names = await alice.list_actions(session_id=c.session_id)
            assert len(names.actions) > 0
    finally:
        await gw.stop()


async def test_a_retired_version_takes_no_new_sessions_and_lets_open_ones_finish(registry, trained_world_dir, tmp_path):
    registry.publish(_changed_world(trained_world_dir, tmp_path / "v2"), "tiny")
    gw = await _gateway(registry)
    try:
        async with GatewayClient(gw.grpc_address, ALICE) as alice:
            image = _prompt(trained_world_dir)
            open_on_2 = (await alice.open(image=image, seed=1, world="tiny")).session
            assert open_on_2.world == "tiny@2"
            registry.retire("tiny", 2)
            assert (await alice.open(image=image, world="tiny")).session.world == "tiny@1"  # the newest live one
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await alice.open(image=image, world="tiny@2")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "retired" in err.value.details()
            await _play(alice, open_on_2.session_id, ACTIONS[:2])  # an open session finishes its play
    finally:
        await gw.stop()


@pytest.mark.parametrize(("world", "code"), [("nope", grpc.StatusCode.NOT_FOUND), ("tiny@9", grpc.StatusCode.NOT_FOUND),
                                             ("Bad Name", grpc.StatusCode.INVALID_ARGUMENT),
                                             ("tiny@zero", grpc.StatusCode.INVALID_ARGUMENT)])
async def test_unknown_worlds_and_malformed_refs_are_refused_clearly(registry, trained_world_dir, world, code):
    gw = await _gateway(registry)
    try:
        async with GatewayClient(gw.grpc_address, ALICE) as alice:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await alice.open(image=_prompt(trained_world_dir), world=world)
            assert err.value.code() == code, err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await alice.list_actions(world=world)
            assert err.value.code() == code
    finally:
        await gw.stop()


async def test_idle_versions_unload_to_keep_the_models_budget_and_reload_unchanged(registry, trained_world_dir, tmp_path):
    registry.publish(_changed_world(trained_world_dir, tmp_path / "v2"), "tiny")
    one = weights_bytes(trained_world_dir)
    gw = await _gateway(registry, models_budget_bytes=one + one // 2)  # room for one version at a time
    try:
        async with GatewayClient(gw.grpc_address, ALICE) as alice:
            image = _prompt(trained_world_dir)
            a = (await alice.open(image=image, seed=3, world="tiny@1")).session
            first = await _play(alice, a.session_id, ACTIONS[:3])
            assert set(gw.worlds.loaded()) == {"tiny@1"}
            c = (await alice.open(image=image, seed=3, world="tiny@2")).session
            await _play(alice, c.session_id, ACTIONS[:1])
            assert set(gw.worlds.loaded()) == {"tiny@2"}  # version 1 was idle: unloaded to make room
            again = await _play(alice, a.session_id, ACTIONS[3:])  # reloads version 1
            assert set(gw.worlds.loaded()) == {"tiny@1"}
            assert sum(gw.worlds.loaded().values()) <= gw.cfg.models_budget_bytes
            b = (await alice.open(image=image, seed=3, world="tiny@1")).session
            for x, y in zip(first + again, await _play(alice, b.session_id, ACTIONS), strict=True):
                np.testing.assert_array_equal(x, y)  # the K/V caches were dropped with the models: same frames
    finally:
        await gw.stop()
    small = await _gateway(registry, models_budget_bytes=one // 2)
    try:
        async with GatewayClient(small.grpc_address, ALICE) as alice:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await alice.open(image=_prompt(trained_world_dir), world="tiny")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "budget" in err.value.details()
    finally:
        await small.stop()


async def test_a_version_damaged_after_publishing_is_reported_not_served(registry, trained_world_dir):
    (registry.resolve("tiny", 1).path / "dynamics" / "model.safetensors").write_bytes(b"not weights")
    gw = await _gateway(registry)
    try:
        async with GatewayClient(gw.grpc_address, ALICE) as alice:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await alice.open(image=_prompt(trained_world_dir), world="tiny")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "does not match its manifest" in err.value.details()
            assert gw.worlds.loaded() == {}
    finally:
        await gw.stop()


async def test_a_gateway_without_a_catalogue_serves_its_one_world_only(trained_world_dir):
    cfg = GatewayConfig(world=str(trained_world_dir), grpc_port=0, http_port=-1, metrics_port=-1, tokens=f"alice:{ALICE}")
    gw = Gateway(cfg, store=MemoryStore())
    await gw.start()
    try:
        async with GatewayClient(gw.grpc_address, ALICE) as alice:
            session = (await alice.open(image=_prompt(trained_world_dir))).session
            assert (session.world, session.world_digest) == ("", "")
            listed = await alice.list_worlds()
            assert (list(listed.worlds), listed.catalogue) == ([], False)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await alice.open(image=_prompt(trained_world_dir), world="tiny")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "one world" in err.value.details()
    finally:
        await gw.stop()

