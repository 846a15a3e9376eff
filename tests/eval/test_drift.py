"""Long sessions past the window T and the drift eval (PSNR vs step, inferred vs random actions)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from genie.data import ShardedClips, ShardWriter, make_source
from genie.eval.drift import drift, infer_long_actions, long_clips, rollout
from genie.eval.metrics import psnr
from genie.train.checkpoint import load_model
from genie.worlds import load_world
from services.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def world_and_lam(trained_world_dir):
    world, _ = load_world(trained_world_dir)
    return world, load_model(Path(trained_world_dir) / "lam", "lam")


def check_session_frames(frames: torch.Tensor, truth: torch.Tensor) -> None:
    """Generated frames (B, S, H, W, C) are valid and non-degenerate against the true clip (B, S, H, W, C)."""
    assert frames.dtype == torch.uint8 and frames.shape == truth.shape, (frames.dtype, frames.shape, truth.shape)
    f = frames.float()
    per_frame_std = f.flatten(2).std(-1)  # (B, S): a frame of one colour has std 0
    assert (per_frame_std > 2.0).all(), per_frame_std.min()
    assert (f[:, 1:] != f[:, :1]).flatten(2).any(-1).any(-1).all(), "every step returned the same frame"
    p = psnr(frames, truth)  # (B, S)
    assert torch.isfinite(p).all() and (p.mean(0) > 12.0).all(), p.mean(0)  # noise frames score ~8 dB


def test_long_clips_and_windowed_action_inference(world_and_lam, tiny_world_cfg):
    world, lam = world_and_lam
    t = world.window
    source = make_source(tiny_world_cfg.data, evaluation=True)
    frames = long_clips(source, 3 * t + 1, 3, seed=0)
    assert frames.shape == (3, 3 * t + 1, 16, 16, 3) and frames.dtype == torch.uint8
    assert torch.equal(frames, long_clips(source, 3 * t + 1, 3, seed=0))
    actions = infer_long_actions(lam, frames)
    assert actions.shape == (3, 3 * t) and int(actions.min()) >= 0 and int(actions.max()) < lam.cfg.num_actions
    w = lam.cfg.max_frames
    assert torch.equal(actions[:, : w - 1], lam.infer_actions(frames[:, :w]))  # the first window, whole
    k = 2 * t  # a later transition k -> k+1 is read with the W-1 frames that end at k+1
    assert torch.equal(actions[:, k], lam.infer_actions(frames[:, k + 2 - w : k + 2])[:, -1])


def test_session_of_3t_steps_stays_valid_and_non_degenerate(world_and_lam, tiny_world_cfg):
    world, lam = world_and_lam
    steps = 3 * world.window  # several slides of the window
    clips = long_clips(make_source(tiny_world_cfg.data, evaluation=True), steps + 1, 4)
    generated = rollout(world, clips[:, :1], infer_long_actions(lam, clips), seeds=[0, 1, 2, 3])
    check_session_frames(generated, clips[:, 1:])
    with pytest.raises(AssertionError):  # the checks catch a world that returns blank frames
        check_session_frames(torch.zeros_like(generated), clips[:, 1:])
    with pytest.raises(AssertionError):  # ... or one stuck on one frame
        check_session_frames(generated[:, :1].expand_as(generated).contiguous(), clips[:, 1:])


def test_drift_curves_and_plot(world_and_lam, tiny_world_cfg, tmp_path):
    world, lam = world_and_lam
    steps = 3 * world.window
    report = drift(world, lam, make_source(tiny_world_cfg.data, evaluation=True), steps, clips=4, out_dir=tmp_path)
    assert report["steps"] == steps and report["clips"] == 4 and report["window"] == world.window
    for name in ("inferred", "random"):
        for stat in ("mean", "p25", "p75"):
            curve = torch.tensor(report[name][stat])
            assert curve.shape == (steps,) and torch.isfinite(curve).all() and (curve > 5).all(), (name, stat, curve)
        assert all(lo <= hi for lo, hi in zip(report[name]["p25"], report[name]["p75"], strict=True))
    assert (tmp_path / "drift.png").read_bytes()[:8] == PNG_MAGIC


def test_long_clips_from_shards_take_whole_long_episodes(tmp_path):
    writer = ShardWriter(tmp_path / "data", frames_per_shard=64)
    for n, length in enumerate((10, 30, 25, 40)):
        frames = np.full((length, 16, 16, 3), n, dtype=np.uint8)
        frames[:, 0, 0, 0] = np.arange(length)
        writer.add(frames, None, {"n": n})
    writer.close({})
    source = ShardedClips(tmp_path / "data", clip_frames=6, seed=1)
    clips = long_clips(source, 25, 8, seed=0)  # only the 3 episodes with >= 25 frames, each from frame 0
    assert clips.shape == (3, 25, 16, 16, 3)
    assert sorted(clips[:, 0, 1, 1, 0].tolist()) == [1, 2, 3] and (clips[:, :, 0, 0, 0] == torch.arange(25)).all()
    assert torch.equal(clips, long_clips(source, 25, 8, seed=0))
    with pytest.raises(ValueError, match="no episode has 41 frames"):
        long_clips(source, 41, 2)


def test_long_clips_rejects_sources_that_cannot_be_long(tmp_path):
    class Fixed:
        def batch(self, step, batch_size):
            raise AssertionError("not called")

    with pytest.raises(ValueError, match="cannot give clips"):
        long_clips(Fixed(), 65, 2)


def test_eval_cli_with_drift_steps_writes_drift_png(trained_world_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--world", str(trained_world_dir), "--clips", "2", "--horizon", "2", "--sampling-steps", "2",
            "--drift-steps", "8", "--drift-clips", "2", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert len(report["drift"]["inferred"]["mean"]) == 8 and report["drift"]["clips"] == 2
    assert (out / "drift.png").read_bytes()[:8] == PNG_MAGIC
