"""CoinRun generation with the real procgen2 simulator."""

import filecmp

import numpy as np
import pytest

from genie.data.procgen import ProcgenConfig, generate
from genie.data.shards import ShardedClips, ShardedDataset


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("coinrun")
    cfg = ProcgenConfig(episodes=6, episodes_per_env=2, max_frames=40, min_frames=16)
    generate(cfg, root / "a", workers=2, progress=False)
    generate(cfg, root / "b", workers=1, progress=False)
    generate(ProcgenConfig(split="val", episodes=2, episodes_per_env=2, max_frames=40), root / "val", progress=False)
    return root


def test_deterministic_and_independent_of_workers(small):
    a, b = ShardedDataset(small / "a"), ShardedDataset(small / "b")
    assert [e.length for e in a.episodes] == [e.length for e in b.episodes]
    for f in (small / "a").glob("*.npy"):
        assert filecmp.cmp(f, small / "b" / f.name, shallow=False)


def test_episodes_and_true_actions(small):
    ds = ShardedDataset(small / "a")
    assert len(ds.episodes) == 6 and ds.frame_shape == (64, 64, 3)
    frames, actions = ds.episode(0)
    assert 16 <= len(frames) <= 40 and frames.dtype == np.uint8
    assert len(actions) == len(frames) - 1 and actions.min() >= 0 and actions.max() < 15
    assert frames.std() > 10  # a rendered game, not a blank screen
    assert ds.info["source"] == "procgen" and ds.info["config"]["env"] == "coinrun"


def test_splits_use_disjoint_levels(small):
    train = {e.meta["level"] for e in ShardedDataset(small / "a").episodes}
    val = {e.meta["level"] for e in ShardedDataset(small / "val").episodes}
    assert max(train) < 1_000_000 <= min(val)


def test_loader_shapes(small):
    batch = ShardedClips(small / "a", clip_frames=16).batch(0, 4)
    assert batch.frames.shape == (4, 16, 64, 64, 3) and batch.actions.shape == (4, 15)


def test_bad_config():
    with pytest.raises(ValueError, match="unknown split"):
        ProcgenConfig(split="dev")
    with pytest.raises(ValueError, match="min_frames"):
        ProcgenConfig(min_frames=50, max_frames=40)


def test_walk_policy_presses_arrow_keys_in_long_runs(tmp_path):
    from genie.data.procgen import WALK_ACTIONS

    cfg = ProcgenConfig(episodes=2, episodes_per_env=2, max_frames=120, policy="walk", hold_min=4, hold_max=8)
    generate(cfg, tmp_path / "walk", progress=False)
    ds = ShardedDataset(tmp_path / "walk")
    assert ds.info["config"]["policy"] == "walk"
    for i in range(len(ds.episodes)):
        actions = ds.episode(i)[1]
        assert set(actions.tolist()) <= set(WALK_ACTIONS)
        runs = np.flatnonzero(np.diff(actions)) + 1  # where the held action changes
        lengths = np.diff(np.concatenate([[0], runs, [len(actions)]]))
        # A run of one key is held 4-8 frames; two draws of the same key in a row make a longer run, and the
        # episode's end cuts the last one short.
        assert lengths[:-1].min() >= 4


def test_bad_policy():
    with pytest.raises(ValueError, match="unknown policy"):
        ProcgenConfig(policy="greedy")
