"""Action names from WORLD/actions.json reach clients: ListActions over the in-process backend, and the WorldSpec
the Triton launcher publishes to clients of the Triton backend."""

from __future__ import annotations

import json
import shutil

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from genie.worlds import save_action_names
from services.gateway.app import Gateway, GatewayConfig
from services.gateway.backend import WorldSpec, world_spec_of
from services.gateway.client import GatewayClient
from services.gateway.inprocess import InProcessBackend
from services.gateway.memory_store import MemoryStore
from services.triton import assemble_repository
from services.triton import protocol as P

TOKEN = "names-token-0123456789"


@pytest.fixture
def named_world(trained_world_dir, tmp_path, tiny_world_cfg):
    world = shutil.copytree(trained_world_dir, tmp_path / "named")
    names = [f"move {chr(ord('a') + i)}" for i in range(tiny_world_cfg.dynamics.num_actions)]
    save_action_names(world, names, "user")
    return world, names


async def _listed_names(world_dir) -> list[str]:
    cfg = GatewayConfig(world=str(world_dir), grpc_port=0, http_port=-1, metrics_port=0, tokens=f"me:{TOKEN}")
    gw = Gateway(cfg, backend=InProcessBackend(world_dir), store=MemoryStore())
    await gw.start()
    try:
        async with GatewayClient(gw.grpc_address, TOKEN) as client:
            return [a.name for a in (await client.list_actions()).actions]
    finally:
        await gw.stop()


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


def test_triton_launcher_publishes_the_names(named_world, tmp_path):
    world, names = named_world
    repo = assemble_repository(world, tmp_path / "repo", models=[P.DYNAMICS])
    config = text_format.Parse((repo.models / P.DYNAMICS / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    spec = WorldSpec.from_dict(json.loads(config.parameters[P.PARAM_WORLD_SPEC].string_value))
    assert list(spec.action_names) == names and spec == world_spec_of(world)
    assert [spec.action_name(a) for a in range(spec.num_actions)] == names
