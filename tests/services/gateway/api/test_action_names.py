"""Action names and arrow key bindings from WORLD/actions.json reach clients: ListActions over the in-process backend,
and the WorldSpec the Triton launcher publishes to clients of the Triton backend."""

from __future__ import annotations

import json
import shutil

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from genie.spec import WorldSpec, world_spec_of
from genie.worlds import apply_action_names_from_report, save_action_names, save_key_bindings
from services.backends.inprocess import InProcessBackend
from services.gateway.api.client import GatewayClient
from services.gateway.app import Gateway, GatewayConfig
from services.gateway.stores.memory_store import MemoryStore
from services.triton import assemble_repository
from services.triton import protocol as P

TOKEN = "names-token-0123456789"


@pytest.fixture
def named_world(trained_world_dir, tmp_path, tiny_world_cfg):
    world = shutil.copytree(trained_world_dir, tmp_path / "named")
    names = [f"move {chr(ord('a') + i)}" for i in range(tiny_world_cfg.dynamics.num_actions)]
    save_action_names(world, names, "user")
    return world, names


@pytest.fixture
def keyed_world(trained_world_dir, tmp_path, tiny_world_cfg):
    """A copy of the tiny world whose eval mapping ties latent 2 to UP (30 of 40) and latent 0 to RIGHT (28 of 40)."""
    world = shutil.copytree(trained_world_dir, tmp_path / "keyed")
    true_names = ["LEFT", "UP", "RIGHT", "NOOP"]
    rows = [[2, 4, 28, 6], [2, 2, 2, 34], [2, 30, 2, 6]] + [[2, 2, 2, 34]] * (tiny_world_cfg.dynamics.num_actions - 3)
    latents = [{"latent": a, "count": sum(r), "counts": r} for a, r in enumerate(rows)]
    apply_action_names_from_report(world, {"lam": {"mapping": {"true_names": true_names, "latents": latents}}})
    return world


async def _listed(world_dir):
    cfg = GatewayConfig(world=str(world_dir), grpc_port=0, http_port=-1, metrics_port=0, tokens=f"me:{TOKEN}")
    gw = Gateway(cfg, backend=InProcessBackend(world_dir), store=MemoryStore())
    await gw.start()
    try:
        async with GatewayClient(gw.grpc_address, TOKEN) as client:
            return await client.list_actions()
    finally:
        await gw.stop()


async def _listed_names(world_dir) -> list[str]:
    return [a.name for a in (await _listed(world_dir)).actions]


def _keys(listed) -> list[tuple[str, int | None, float | None]]:
    return [(b.key, b.action if b.HasField("action") else None, round(b.share, 3) if b.HasField("share") else None)
            for b in listed.keys]


async def test_list_actions_returns_the_names_of_actions_json(named_world):
    world, names = named_world
    assert await _listed_names(world) == names


async def test_list_actions_without_names_file_says_action_n(trained_world_dir, tiny_world_cfg):
    assert await _listed_names(trained_world_dir) == [f"action {i}" for i in range(tiny_world_cfg.dynamics.num_actions)]


async def test_malformed_names_file_stops_the_backend_with_a_clear_error(named_world):
    world, _ = named_world
    (world / "actions.json").write_text('{"names": ["only one"]}')
    with pytest.raises(ValueError, match="actions.json"):
        await InProcessBackend(world).start()


async def test_list_actions_returns_the_key_bindings(keyed_world):
    assert _keys(await _listed(keyed_world)) == [("left", None, None), ("right", 0, 0.7), ("up", 2, 0.75),
                                                 ("down", None, None)]
    save_key_bindings(keyed_world, {"left": 1, "up": 2}, "user")  # set by hand: no share
    assert _keys(await _listed(keyed_world)) == [("left", 1, None), ("right", None, None), ("up", 2, None),
                                                 ("down", None, None)]


async def test_list_actions_without_bindings_lists_every_key_unbound(trained_world_dir):
    assert _keys(await _listed(trained_world_dir)) == [(k, None, None) for k in ("left", "right", "up", "down")]


async def test_a_key_bound_outside_the_world_stops_the_backend(keyed_world, tiny_world_cfg):
    doc = json.loads((keyed_world / "actions.json").read_text())
    doc["keys"]["up"] = tiny_world_cfg.dynamics.num_actions
    (keyed_world / "actions.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="actions.json: .*out of range"):
        await InProcessBackend(keyed_world).start()


def test_triton_launcher_publishes_the_key_bindings(keyed_world, tmp_path):
    repo = assemble_repository(keyed_world, tmp_path / "repo", models=[P.DYNAMICS])
    config = text_format.Parse((repo.models / P.DYNAMICS / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    spec = WorldSpec.from_dict(json.loads(config.parameters[P.PARAM_WORLD_SPEC].string_value))
    assert spec == world_spec_of(keyed_world)
    assert [(b.key, b.action) for b in spec.key_bindings()] == [("left", None), ("right", 0), ("up", 2), ("down", None)]
    old = spec.to_dict()
    del old["keys"]  # a spec published before key bindings existed: every key unbound
    assert all(b.action is None for b in WorldSpec.from_dict(old).key_bindings())


def test_triton_launcher_publishes_the_names(named_world, tmp_path):
    world, names = named_world
    repo = assemble_repository(world, tmp_path / "repo", models=[P.DYNAMICS])
    config = text_format.Parse((repo.models / P.DYNAMICS / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    spec = WorldSpec.from_dict(json.loads(config.parameters[P.PARAM_WORLD_SPEC].string_value))
    assert list(spec.action_names) == names and spec == world_spec_of(world)
    assert [spec.action_name(a) for a in range(spec.num_actions)] == names
