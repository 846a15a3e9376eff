"""`genie world build`: videos -> imported dataset -> tokenizer, LAM, dynamics -> a world that plays; interrupted
builds resume where they stopped; a user's action names survive a rebuild; bad input fails before training."""

import json
from dataclasses import replace

import av
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from genie.build import BuildConfig, build_world, stage_step, with_data
from genie.cli import main
from genie.config import apply_overrides
from genie.data.video import VideoImportConfig, import_videos
from genie.presets import tiny
from genie.worlds import load_action_names, load_key_bindings, load_world, save_action_names, save_key_bindings

STEPS = {"tokenizer": 6, "lam": 4, "dynamics": 6}
OVERRIDES = [f"train_{k}.{f}={v}" for k, n in STEPS.items() for f, v in (("steps", n), ("ckpt_every", 2),
                                                                          ("warmup_steps", 1))]


def write_video(path, n=90, h=40, w=56, fps=30):
    """An x264 mp4 of a scrolling gradient with a sliding bar: every frame differs from the last."""
    yy, xx = np.mgrid[:h, :w]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for t in range(n):
            f = np.zeros((h, w, 3), np.uint8)
            f[..., 0] = (xx * 3 + t * 9) % 256
            f[..., 1] = yy * 5
            cx = (t * 3) % w
            f[8:20, max(0, cx - 5) : cx + 5, 2] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Two short videos imported at 16x16 (train) and one more (held out)."""
    root = tmp_path_factory.mktemp("videos")
    cfg = VideoImportConfig(fps=15, height=16, width=16, min_frames=6, static_threshold=0)
    import_videos([write_video(root / "a.mp4"), write_video(root / "b.mp4", n=120)], root / "train", cfg, progress=False)
    import_videos([write_video(root / "c.mp4", n=60)], root / "val", cfg, progress=False)
    return root


def config(tmp_path, videos, **kw) -> BuildConfig:
    world = with_data(apply_overrides(tiny(), OVERRIDES), str(videos / "train"), str(videos / "val"))
    return BuildConfig(world=world, out=str(tmp_path / "world"), **{"eval_clips": 4, "atlas_prompts": 2, **kw})


def test_build_from_videos_writes_a_playable_world(tmp_path, videos):
    cfg = config(tmp_path, videos)
    reported = []
    result = build_world(cfg, on_stage=reported.append)
    out = tmp_path / "world"
    assert result.stopped is None and result.world == out
    assert [s.stage for s in result.stages] == ["tokenizer", "lam", "dynamics", "export", "eval"]
    assert reported == result.stages  # every stage reaches the progress lines, export too
    assert [s.step for s in result.stages[:3]] == [6, 4, 6]
    for name in ("world.json", "tokenizer/model.safetensors", "lam/config.json", "dynamics/model.safetensors",
                 "eval/report.json", "actions.json", "build.json", "prompts/00.png"):
        assert (out / name).is_file(), name
    record = json.loads((out / "build.json").read_text())
    assert record["data"]["path"] == str(videos / "train") and record["eval"]["held_out"] is True
    assert [s["stage"] for s in record["stages"]] == ["tokenizer", "lam", "dynamics", "export", "eval"]
    # Imported videos have no true actions: no mapping, so the names stay the defaults.
    assert result.action_names == [f"action {i}" for i in range(4)]
    assert "lam" not in result.report
    assert load_key_bindings(out, 4) == (dict.fromkeys(("left", "right", "up", "down")), "default")  # and no keys
    world, _ = load_world(out)
    states, _ = world.reset(torch.zeros(1, 1, 16, 16, 3, dtype=torch.uint8), seeds=[0])
    states, frames = world.step(states, [2])
    assert frames.shape == (1, 16, 16, 3) and frames.dtype == torch.uint8


def test_interrupted_build_resumes_the_stage_it_stopped_in(tmp_path, videos):
    cfg = config(tmp_path, videos, eval_clips=0)

    def stop_in_dynamics(stage, done, logs):
        return stage == "dynamics" and done == 2

    first = build_world(cfg, on_step=stop_in_dynamics)
    assert first.stopped == "dynamics"
    assert stage_step(cfg, "dynamics") == 2  # checkpointed where it stopped
    assert not (tmp_path / "world").exists()  # no half world
    second = build_world(cfg)
    by_stage = {s.stage: s for s in second.stages}
    assert by_stage["tokenizer"].skipped and by_stage["lam"].skipped
    assert by_stage["dynamics"].resumed_from == 2 and by_stage["dynamics"].step == 6
    assert (tmp_path / "world" / "build.json").is_file()


def test_a_build_on_the_encoded_dataset_resumes_without_encoding_it_again(tmp_path, videos, monkeypatch):
    from genie.train import token_cache

    cfg = config(tmp_path, videos, eval_clips=0)
    cfg = replace(cfg, world=apply_overrides(cfg.world, ["train_dynamics.encode_once=true"]))
    first = build_world(cfg, on_step=lambda stage, done, logs: stage == "dynamics" and done == 2)
    assert first.stopped == "dynamics" and (cfg.runs / "dynamics" / "token-cache" / "key.json").is_file()
    encoded = []
    monkeypatch.setattr(token_cache, "_encode_windows", lambda *a: encoded.append(a))
    second = build_world(cfg)
    dynamics = next(s for s in second.stages if s.stage == "dynamics")
    assert (dynamics.resumed_from, dynamics.step, encoded) == (2, 6, [])
    assert json.loads((tmp_path / "world" / "world.json").read_text())["train_dynamics"]["encode_once"] is True


def test_rebuild_keeps_names_a_user_edited(tmp_path, videos):
    cfg = config(tmp_path, videos, eval_clips=0)
    build_world(cfg)
    names = ["left", "right", "jump", "wait"]
    save_action_names(tmp_path / "world", names, source="user")
    save_key_bindings(tmp_path / "world", {"up": 2}, "user")
    build_world(cfg)  # every training stage is complete: export + eval run again
    assert load_action_names(tmp_path / "world", 4) == names
    assert load_key_bindings(tmp_path / "world", 4) == ({"left": None, "right": None, "up": 2, "down": None}, "user")


def test_a_run_root_of_another_config_is_refused_before_training(tmp_path, videos):
    cfg = config(tmp_path, videos, eval_clips=0)
    build_world(cfg)
    other = BuildConfig(world=apply_overrides(cfg.world, ["tokenizer.encoder.dim=48"]), out=cfg.out, eval_clips=0)
    with pytest.raises(ValueError, match="different tokenizer config"):
        build_world(other)


def test_cli_builds_and_reports_bad_input(tmp_path, videos):
    runner = CliRunner()
    args = ["world", "build", "--preset", "tiny", "--data", str(videos / "train"), "--eval-data", str(videos / "val"),
            "--out", str(tmp_path / "w"), "--eval-clips", "4", "--atlas-prompts", "1", "--quiet"]
    for o in OVERRIDES:
        args += ["--set", o]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(summary["stages"]) == {"tokenizer", "lam", "dynamics", "export", "eval"}
    assert summary["eval"]["tokenizer"]["psnr"] > 0
    bad = runner.invoke(main, ["world", "build", "--preset", "tiny", "--data", str(tmp_path / "nope"), "--out",
                               str(tmp_path / "w2")])
    assert bad.exit_code == 2 and "is not a dataset directory" in bad.stderr
    assert not (tmp_path / "w2").exists() and not (tmp_path / ".w2.runs").exists()
