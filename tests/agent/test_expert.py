"""The CoinRun expert planner and its recordings (real procgen2 simulator)."""

import numpy as np
import pytest

from genie.agent.expert import ExpertConfig, episode_level, make_env, plan_episode
from genie.data.shards import ShardedDataset

from .conftest import SMALL_EXPERT


def test_recorded_actions_replay_to_the_same_frames(expert_data):
    ds = ShardedDataset(expert_data)
    assert ds.info["source"] == "procgen-expert" and len(ds.episodes) == SMALL_EXPERT.episodes
    for i, ep in enumerate(ds.episodes):
        frames, actions = ds.episode(i)
        assert len(actions) == len(frames) - 1 and (actions >= 0).all()
        env = make_env("coinrun", ep.meta["level"], "easy")
        replayed = [env.observe()[1]["rgb"][0].copy()]
        for a in actions:
            env.act(np.array([a]))
            replayed.append(env.observe()[1]["rgb"][0].copy())
        np.testing.assert_array_equal(np.stack(replayed), frames)


def test_planner_is_deterministic_and_levels_are_pure():
    a, b = plan_episode(SMALL_EXPERT, 1), plan_episode(SMALL_EXPERT, 1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2]["level"] == episode_level("train", 0, 1, SMALL_EXPERT.num_levels)
    assert episode_level("test", 0, 1, 10_000) >= 2_000_000  # held-out levels come from their own range


def test_expert_reaches_the_coin_on_held_out_levels():
    cfg = ExpertConfig(split="test", episodes=6, max_frames=400)
    wins = sum(plan_episode(cfg, i)[2]["success"] for i in range(cfg.episodes))
    assert wins >= 5  # a random policy reaches it on a minority of levels


@pytest.mark.parametrize("bad", [dict(split="nope"), dict(episodes=0), dict(commit=30, horizon=24), dict(hold_min=0)])
def test_bad_config(bad):
    with pytest.raises(ValueError):
        ExpertConfig(**bad)
