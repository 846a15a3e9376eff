"""The BC policy, the latent -> real mapping and the LAM labels."""

import numpy as np
import pytest
import torch

from genie.agent.policy import (
    ActionMapping,
    Policy,
    PolicyConfig,
    context_frames,
    label_latent_actions,
    random_shift,
)

from .conftest import tiny_lam


def test_mapping_recovers_a_known_correspondence():
    rng = np.random.default_rng(0)
    truth = np.array([7, 8, 5, 4])  # latent z means real action truth[z]
    latent = rng.integers(0, 4, size=200)
    real = truth[latent].copy()
    noise = rng.random(200) < 0.3  # 30% of labels are another action
    real[noise] = rng.integers(0, 15, size=noise.sum())
    m = ActionMapping.fit(latent, real, num_latent=4, num_real=15)
    assert m.table == tuple(truth)
    np.testing.assert_array_equal(m(np.array([3, 0, 1])), [4, 7, 8])
    assert m.labelled == 200 and sum(map(sum, m.counts)) == 200


def test_unseen_latent_maps_to_the_overall_majority():
    m = ActionMapping.fit(np.array([0, 0, 1]), np.array([7, 7, 2]), num_latent=3, num_real=15)
    assert m.table == (7, 2, 7)


@pytest.mark.parametrize("latent,real", [([0, 5], [1, 1]), ([0], [1, 2]), ([], [])])
def test_mapping_rejects_bad_input(latent, real):
    with pytest.raises(ValueError):
        ActionMapping.fit(np.array(latent, dtype=np.int64), np.array(real, dtype=np.int64), 4, 15)


def test_labels_are_a_pure_function_of_the_frames():
    lam = tiny_lam()
    frames = np.random.default_rng(1).integers(0, 256, size=(13, 64, 64, 3), dtype=np.uint8)
    labels = label_latent_actions(lam, frames)
    assert labels.shape == (12,) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, label_latent_actions(lam, frames.copy(), batch=1))  # batching changes nothing
    w = lam.cfg.max_frames  # windows of W frames overlapping by one
    np.testing.assert_array_equal(labels[: w - 1], lam.infer_actions(torch.from_numpy(frames[None, :w]))[0].numpy())
    np.testing.assert_array_equal(labels[w - 1 : 2 * w - 2],
                                  lam.infer_actions(torch.from_numpy(frames[None, w - 1 : 2 * w - 1]))[0].numpy())
    # an episode's labels do not depend on other episodes: the first episode of a longer recording is labelled alike
    np.testing.assert_array_equal(label_latent_actions(lam, frames[:9]), labels[:8])


def test_policy_shapes_and_errors():
    p = Policy(PolicyConfig(num_actions=5, context=2))
    frames = torch.randint(0, 256, (3, 2, 64, 64, 3), dtype=torch.uint8)
    assert p(frames).shape == (3, 5)
    gen = torch.Generator().manual_seed(0)
    a = p.act(frames, generator=gen)
    assert a.shape == (3,) and ((a >= 0) & (a < 5)).all()
    with pytest.raises(ValueError, match="expected frames"):
        p(frames[:, :1])


def test_the_impala_trunk_takes_the_same_frames_and_bad_configs_are_refused():
    p = Policy(PolicyConfig(num_actions=15, context=2, width_mult=8, arch="impala"))
    frames = torch.randint(0, 256, (2, 2, 64, 64, 3), dtype=torch.uint8)
    assert p(frames).shape == (2, 15)
    assert p.trunk[0][2].conv0.in_channels == 4  # stage 1: width_mult/2 channels, two residual blocks
    with pytest.raises(ValueError, match="arch"):
        PolicyConfig(arch="resnet")
    with pytest.raises(ValueError, match="width_mult"):
        PolicyConfig(width_mult=1)


def test_random_shift_moves_all_frames_of_an_example_alike():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(16, 2, 12, 12, 3), dtype=np.uint8)
    frames[:, 1] = frames[:, 0]  # two identical frames: any shift keeps them identical
    shifted = random_shift(frames, 2, np.random.default_rng(1))
    assert shifted.shape == frames.shape and shifted.dtype == np.uint8
    np.testing.assert_array_equal(shifted[:, 0], shifted[:, 1])
    assert any(not np.array_equal(shifted[i], frames[i]) for i in range(16))  # something moved
    # an unshifted interior: every shifted example holds the original's centre somewhere within +-2 pixels
    for i in range(16):
        centre = frames[i, 0, 2:10, 2:10]
        assert any(np.array_equal(shifted[i, 0, 2 + dy : 10 + dy, 2 + dx : 10 + dx], centre)
                   for dy in range(-2, 3) for dx in range(-2, 3))
    assert random_shift(frames, 0, rng) is frames


def test_context_frames_repeat_the_first_frame():
    frames = np.arange(4)[:, None, None, None] * np.ones((4, 2, 2, 3), dtype=np.uint8)
    ctx = context_frames(frames, np.array([0, 2]), 3)  # (2, 3, 2, 2, 3)
    assert ctx[:, :, 0, 0, 0].tolist() == [[0, 0, 0], [0, 1, 2]]
