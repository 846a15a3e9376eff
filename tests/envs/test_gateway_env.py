"""WorldEnv through a real gRPC gateway (in-process backend, untrained tiny world): check_env passes and the frames
equal the in-process env's for the same seed and actions."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from genie.config import to_dict
from genie.envs import WorldEnv, WorldVectorEnv
from genie.presets import tiny
from genie.train.checkpoint import build_model, checkpoint_dir, save_checkpoint, untrained_frozen
from genie.worlds import export_world

TOKEN = "alice-token-0123456789"


@pytest.fixture(scope="module")
def untrained_world(tmp_path_factory):
    cfg = tiny()
    root = tmp_path_factory.mktemp("untrained")
    untrained_frozen(cfg, root)
    save_checkpoint(checkpoint_dir(root / "dynamics", 0), "dynamics", build_model("dynamics", cfg.model_config("dynamics")), 0)
    (root / "dynamics" / "world.json").write_text(json.dumps(to_dict(cfg)))
    return export_world(root, tmp_path_factory.mktemp("world") / "tiny")


@pytest.fixture(scope="module")
def gateway(untrained_world):
    from services.backends.inprocess import InProcessBackend
    from services.gateway.app import Gateway, GatewayConfig
    from services.gateway.sessions import Limits
    from services.gateway.stores.memory_store import MemoryStore

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cfg = GatewayConfig(world=str(untrained_world), grpc_port=0, http_port=-1, metrics_port=0, tokens=f"alice:{TOKEN}",
                        limits=Limits(max_sessions_per_client=64, requests_per_second=10_000))
    gw = Gateway(cfg, backend=InProcessBackend(untrained_world), store=MemoryStore())
    asyncio.run_coroutine_threadsafe(gw.start(), loop).result()
    yield gw
    asyncio.run_coroutine_threadsafe(gw.stop(), loop).result()
    loop.call_soon_threadsafe(loop.stop)


@pytest.fixture
def engine(gateway):
    from services.gym_remote import GatewayEngine

    e = GatewayEngine(gateway.grpc_address, TOKEN)
    yield e
    e.shutdown()


def test_check_env_through_the_gateway(engine, untrained_world):
    env = WorldEnv(untrained_world)  # only for its prompts
    remote = WorldEnv(engine=engine, prompts=env._s.prompts, max_steps=4)
    assert remote.action_space.n == 4 and remote.observation_space.shape == (16, 16, 3)
    check_env(remote)
    remote.close()


def test_remote_and_in_process_frames_agree(engine, untrained_world):
    local = WorldEnv(untrained_world)
    remote = WorldEnv(engine=engine, prompts=local._s.prompts)
    runs = []
    for env in (local, remote):
        frames = [env.reset(seed=5, options={"prompt": 2})[0]] + [env.step(a)[0] for a in (1, 3, 0, 2)]
        runs.append(np.stack(frames))
    np.testing.assert_array_equal(runs[0], runs[1])
    venv = WorldVectorEnv(2, engine=engine, prompts=local._s.prompts)
    obs, _ = venv.reset(seed=[5, 6], options={"prompts": [2, 2]})
    np.testing.assert_array_equal(obs[0], runs[1][0])
    obs, *_ = venv.step(np.array([1, 1]))
    np.testing.assert_array_equal(obs[0], runs[1][1])
    venv.close()
