"""The one-to-one accuracy ceiling, against the real CoinRun simulator and hand-made label tables."""

import numpy as np
import pytest

from genie.data.procgen import ACTION_NAMES, ProcgenConfig, generate
from genie.data.shards import ShardedDataset
from genie.eval.ceiling import ceiling, equivalence_classes, one_to_one

NOOP, DOWN, LETTERS = 4, 3, range(9, 15)  # keys CoinRun ignores


@pytest.fixture(scope="module")
def cfg():
    return ProcgenConfig(split="val", episodes=2, episodes_per_env=2, max_frames=40, min_frames=16)


def test_replays_the_generated_dataset(cfg, tmp_path):
    generate(cfg, tmp_path / "val", progress=False)
    recorded = ShardedDataset(tmp_path / "val")
    true, groups, mismatches = equivalence_classes(cfg)
    assert mismatches == 0  # every recorded action reproduced its recorded frame
    assert true.tolist() == np.concatenate([recorded.episode(i)[1] for i in range(2)]).tolist()
    assert all(a in g for a, g in zip(true, groups, strict=True))
    # The keys CoinRun ignores always do what NOOP does.
    for a, g in zip(true, groups, strict=True):
        if a in LETTERS or a == DOWN:
            assert NOOP in g
    assert any(len(g) >= 8 for g in groups)


def test_one_to_one_limits_the_labels():
    labels = np.array([0, 0, 1, 1, 2, 2, 3])
    true = np.array([5, 5, 6, 6, 7, 7, 8])
    assert one_to_one(labels, true, len(ACTION_NAMES)) == 1.0
    assert one_to_one(labels, true, 3) == pytest.approx(6 / 7)  # the smallest group is left unmapped
    assert one_to_one(labels, true, 1) == pytest.approx(2 / 7)
    assert one_to_one(np.zeros(4, int), np.array([1, 2, 3, 3]), 8) == 0.5  # one label names one action


def test_ceiling_is_below_one_on_coinrun(cfg):
    report = ceiling(cfg, horizon=2)
    assert report["transitions"] > 0 and report["replay_mismatches"] == 0
    assert report["majority_baseline"] <= report["ceiling_one_to_one"] <= report["ceiling_one_to_one_all_labels"] < 1
