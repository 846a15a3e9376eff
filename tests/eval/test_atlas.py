"""The action atlas: files and grid layout, reproducibility, batching invariance, and the per-action numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from genie.data import make_source
from genie.eval.atlas import CELL_SCALE, GAP, TITLE, action_atlas, action_distinctness, atlas_rollouts
from genie.eval.metrics import PSNR_CAP
from genie.media import CAPTION_HEIGHT
from genie.sampling import SamplingConfig, World
from genie.worlds import load_world

SAMPLING = SamplingConfig(steps=2, temperature=1.0)


@pytest.fixture(scope="module")
def world(trained_world_dir):
    return load_world(trained_world_dir, sampling=SAMPLING)[0]


@pytest.fixture(scope="module")
def prompts(tiny_world_cfg):
    return make_source(tiny_world_cfg.data, evaluation=True).batch(0, 3).frames[:, 0]  # (3, H, W, C)


def test_atlas_files_grid_and_numbers(world, prompts, tmp_path):
    a, (h, w) = world.num_actions, prompts.shape[1:3]
    names = [f"move {i}" for i in range(a)]
    out3 = action_atlas(world, prompts, 3, names, tmp_path / "p3", seed=1)
    out2 = action_atlas(world, prompts[:2], 3, names, tmp_path / "p2", seed=1)
    with Image.open(out3["png"]) as png3, Image.open(out2["png"]) as png2, Image.open(out3["gif"]) as gif:
        # One row per action plus the prompt row; one column per prompt.
        assert png3.height == TITLE + GAP + (a + 1) * (h * CELL_SCALE + GAP)
        assert png3.width - png2.width == w * CELL_SCALE + GAP and png3.height == png2.height
        assert gif.n_frames == 3 + 1 and gif.height == TITLE + GAP + (a + 1) * (h + GAP) + CAPTION_HEIGHT
    assert [e["name"] for e in out3["actions"]] == names and out3["prompts"] == 3 and out3["steps"] == 3
    for entry in out3["actions"]:
        for key in ("change", "psnr_vs_prompt", "psnr_vs_other_actions"):
            assert math.isfinite(entry[key]), entry
    assert math.isfinite(out3["mean_psnr_between_actions"])


def test_atlas_is_reproducible_and_batching_does_not_change_it(world, prompts, tmp_path):
    a = action_atlas(world, prompts[:2], 2, None, tmp_path / "a", seed=3)
    b = action_atlas(world, prompts[:2], 2, None, tmp_path / "b", seed=3)
    assert a["actions"] == b["actions"] and a["actions"][0]["name"] == "action 0"
    assert np.array_equal(np.array(Image.open(a["png"])), np.array(Image.open(b["png"])))
    whole = atlas_rollouts(world, prompts[:2], 2, seed=3)  # (A, P, 3, H, W, C)
    split = atlas_rollouts(world, prompts[:2], 2, seed=3, batch_size=3)
    assert whole.shape == (world.num_actions, 2, 3, *prompts.shape[1:]) and torch.equal(whole, split)
    by_hand = World(world.tokenizer, world.dynamics, world.sampling, cache_bytes=0)  # recomputes every history
    states, first = by_hand.reset(prompts[1:2, None], [3])  # action 1 from prompt 1, stepped by hand
    frames = [first]
    for _ in range(2):
        states, frame = by_hand.step(states, [1])
        frames.append(frame)
    assert by_hand.cache_counts[0] == 0 and torch.equal(whole[1, 1], torch.cat(frames))  # no hit: all recomputed


def test_actions_of_a_trained_world_differ(world, prompts):
    rollouts = atlas_rollouts(world, prompts, 4, seed=0)
    final = rollouts[:, :, -1]  # (A, P, H, W, C)
    assert any(not torch.equal(final[0], final[k]) for k in range(1, world.num_actions))
    assert action_distinctness(rollouts)["mean_psnr_between_actions"] < PSNR_CAP


def test_distinctness_numbers_on_hand_made_rollouts():
    still = torch.full((3, 2, 2, 4, 4, 3), 100, dtype=torch.uint8)  # (A, P, T, H, W, C): nothing moves
    numbers = action_distinctness(still)
    assert numbers["mean_psnr_between_actions"] == pytest.approx(PSNR_CAP)
    assert all(e["change"] == 0 and e["psnr_vs_prompt"] == pytest.approx(PSNR_CAP) for e in numbers["actions"])
    moved = still.clone()
    moved[2, :, -1] = 110  # action 2 brightens every pixel by 10
    by = action_distinctness(moved)["actions"]
    assert by[2]["change"] == pytest.approx(10) and by[0]["change"] == 0
    expected = 10 * math.log10(255**2 / 10**2)  # PSNR of a uniform 10-level difference
    assert by[2]["psnr_vs_other_actions"] == pytest.approx(expected, rel=1e-4)
    assert by[0]["psnr_vs_other_actions"] == pytest.approx((PSNR_CAP + expected) / 2, rel=1e-4)


def test_atlas_rejects_bad_names(world, prompts, tmp_path):
    with pytest.raises(ValueError, match="names"):
        action_atlas(world, prompts, 1, ["only one"], tmp_path)
