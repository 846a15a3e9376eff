"""WorldEnv and WorldVectorEnv over a tiny untrained world: gymnasium's checks, seeding, batching, real actions."""

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from genie.agent.policy import ActionMapping
from genie.envs import InProcessEngine, WorldEnv, WorldVectorEnv, real_to_latent
from genie.presets import tiny
from genie.sampling import World
from genie.train.checkpoint import build_model


class CountingEngine(InProcessEngine):
    """Counts engine calls, to show a vector step is one batched call."""

    def __init__(self, world) -> None:
        super().__init__(world)
        self.steps: list[int] = []

    def step(self, handles, actions):
        self.steps.append(len(handles))
        return super().step(handles, actions)


@pytest.fixture(scope="module")
def world():
    cfg = tiny()
    torch.manual_seed(0)
    return World(build_model("tokenizer", cfg.model_config("tokenizer")).eval(),
                 build_model("dynamics", cfg.model_config("dynamics")).eval(), cfg.sampling)


@pytest.fixture(scope="module")
def prompts():
    return np.random.default_rng(0).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)


def test_check_env_passes(world, prompts):
    env = WorldEnv(engine=InProcessEngine(world), prompts=prompts, max_steps=5, render_mode="rgb_array")
    check_env(env, skip_render_check=False)
    obs, info = env.reset(seed=3, options={"prompt": 1})
    assert obs.shape == (16, 16, 3) and obs.dtype == np.uint8 and env.action_space.n == 4
    for t in range(5):
        obs, reward, terminated, truncated, info = env.step(t % 4)
        assert reward == 0.0 and not terminated and truncated == (t == 4) and info["latent_action"] == t % 4
    assert np.array_equal(env.render(), obs)


def test_a_seed_fixes_the_episode(world, prompts):
    env = WorldEnv(engine=InProcessEngine(world), prompts=prompts)
    runs = []
    for _ in range(2):
        frames = [env.reset(seed=7)[0]] + [env.step(a)[0] for a in (0, 3, 1)]
        runs.append(np.stack(frames))
    assert np.array_equal(*runs)
    other = np.stack([env.reset(seed=8, options={"prompt": prompts[2]})[0]] + [env.step(a)[0] for a in (0, 3, 1)])
    assert not np.array_equal(runs[0], other)


def test_vector_env_matches_single_envs_and_steps_in_one_call(world, prompts):
    engine = CountingEngine(world)
    venv = WorldVectorEnv(3, engine=engine, prompts=prompts, max_steps=3)
    actions = np.array([[0, 1, 2], [3, 3, 0], [1, 0, 2]])
    obs, info = venv.reset(seed=10)
    vec = [obs]
    for a in actions:
        obs, rew, term, trunc, _ = venv.step(a)
        vec.append(obs)
    assert engine.steps == [3, 3, 3]  # one batched engine call per vector step
    assert trunc.all() and not term.any() and (rew == 0).all()
    for i in range(3):
        env = WorldEnv(engine=InProcessEngine(world), prompts=prompts, max_steps=3)
        single = [env.reset(seed=10 + i)[0]] + [env.step(int(a))[0] for a in actions[:, i]]
        np.testing.assert_array_equal(np.stack(single), np.stack([v[i] for v in vec]))
    obs, *_ = venv.step(np.zeros(3, dtype=np.int64))  # next-step autoreset: every sub-env starts a new episode
    assert engine.steps == [3, 3, 3] and (venv._t == 0).all()


def test_real_actions_through_a_mapping(world, prompts):
    counts = np.zeros((4, 15), dtype=np.int64)
    counts[0, 7], counts[1, 8], counts[2, 5], counts[3, 7] = 9, 5, 4, 2  # RIGHT mostly latent 0
    mapping = ActionMapping((7, 8, 5, 7), tuple(map(tuple, counts.tolist())), 20)
    assert real_to_latent(mapping).tolist()[5:9] == [2, 0, 0, 1]  # unlabelled real actions play RIGHT's latent
    env = WorldEnv(engine=InProcessEngine(world), prompts=prompts, mapping=mapping, max_steps=4)
    assert env.action_space.n == 15
    check_env(env)
    env.reset(seed=0)
    assert env.step(8)[4]["latent_action"] == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_steps=0), "max_steps"),
    (dict(prompts=np.zeros((2, 8, 8, 3), dtype=np.uint8)), "prompts"),
    (dict(render_mode="human"), "render_mode"),
])
def test_bad_arguments(world, prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorldEnv(engine=InProcessEngine(world), **{"prompts": prompts, **kwargs})


def test_bad_actions_and_prompts(world, prompts):
    env = WorldEnv(engine=InProcessEngine(world), prompts=prompts)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="not in"):
        env.step(4)
    with pytest.raises(ValueError, match="out of range"):
        env.reset(options={"prompt": 3})
    venv = WorldVectorEnv(2, engine=InProcessEngine(world), prompts=prompts)
    with pytest.raises(ValueError, match="seeds"):
        venv.reset(seed=[1, 2, 3])
