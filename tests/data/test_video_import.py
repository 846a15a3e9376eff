"""`genie data import`: real containers written with PyAV/Pillow from synthetic frames, resampled, cropped, split."""

import filecmp
import json

import av
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from genie.cli import main
from genie.config import apply_overrides
from genie.data.shards import ShardedClips, ShardedDataset
from genie.data.video import EpisodeSplitter, FileStats, VideoImportConfig, import_videos
from genie.presets import tiny
from genie.train.loop import train


def moving(n, h=48, w=80, offset=0):
    """(n, h, w, 3) uint8: a scrolling gradient and a sliding bar, so every frame differs from the last."""
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, h, w, 3), np.uint8)
    for t in range(offset, offset + n):
        f = out[t - offset]
        f[..., 0] = (xx * 3 + t * 9) % 256
        f[..., 1] = yy * 5
        cx = (t * 3) % w
        f[10:24, max(0, cx - 6) : cx + 6, 2] = 255
    return out


def write_video(path, frames, fps=30, codec="libx264", pix_fmt="yuv420p"):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_gif(path, frames, ms=100):
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=ms, loop=0)
    return path


def write_pngs(folder, frames):
    folder.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"frame{i}.png")  # frame10 must sort after frame9
    return folder


CFG = VideoImportConfig(min_frames=4)


def lengths(root):
    return [e.length for e in ShardedDataset(root).episodes]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    return {
        "mp4": write_video(root / "a.mp4", moving(90)),  # 3 s at 30 fps
        "mpeg4": write_video(root / "b.mkv", moving(45, offset=7), fps=15, codec="mpeg4"),  # 3 s at 15 fps
        "webm": write_video(root / "c.webm", moving(30, offset=3), fps=30, codec="libvpx"),  # 1 s
        "gif": write_gif(root / "d.gif", moving(20, offset=5)),  # 2 s at 10 fps
        "pngs": write_pngs(root / "e", moving(12, offset=9)),
    }


@pytest.mark.parametrize(("kind", "expected"), [("mp4", 30), ("mpeg4", 30), ("webm", 10), ("gif", 20), ("pngs", 12)])
def test_containers_resample_and_fit(tmp_path, videos, kind, expected):
    summary = import_videos([videos[kind]], tmp_path / "ds", CFG, progress=False)
    assert summary["imported_files"] == 1 and not summary["rejected"], summary
    assert abs(summary["frames"] - expected) <= 1, summary  # 30 fps -> 10 fps keeps a third
    assert summary["dropped_static"] == 0 and summary["episodes"] == 1
    ds = ShardedDataset(tmp_path / "ds")
    frames, actions = ds.episode(0)
    assert frames.shape[1:] == (64, 64, 3) and frames.dtype == np.uint8 and (actions == -1).all()
    assert ds.info["source"] == "video" and ds.info["num_true_actions"] == 0
    assert frames[..., 1].std() > 20  # the vertical gradient survived the crop


def test_size_crop_and_slower_source(tmp_path, videos):
    cfg = VideoImportConfig(fps=20, height=16, width=40, min_frames=4)
    summary = import_videos([videos["mpeg4"]], tmp_path / "ds", cfg, progress=False)
    assert summary["frames"] == 45  # a 15 fps source is never upsampled to 20 fps
    assert ShardedDataset(tmp_path / "ds").frame_shape == (16, 40, 3)
    assert abs(summary["source_hours"] * 3600 - 3.0) < 0.1


def test_static_stretches_cuts_and_max_length(tmp_path):
    clip = np.concatenate([moving(30), np.repeat(moving(1, offset=29), 25, 0),  # still for 25 frames: dropped
                           moving(20, offset=30), np.repeat(moving(1, offset=49), 4, 0),  # a 4-frame pause: kept
                           255 - moving(26, offset=50)])  # a scene cut (inverted picture)
    path = write_video(tmp_path / "v.mp4", clip, fps=10)
    cfg = VideoImportConfig(static_frames=8, min_frames=4, max_frames=40)
    summary = import_videos([path], tmp_path / "ds", cfg, progress=False)
    assert summary["dropped_static"] == 25, summary
    assert lengths(tmp_path / "ds") == [30, 24, 26]
    summary = import_videos([path], tmp_path / "off", VideoImportConfig(static_threshold=0, scene_cut=0, max_frames=40,
                                                                         min_frames=4), progress=False)
    assert lengths(tmp_path / "off") == [40, 40, 25] and summary["dropped_static"] == 0


def test_splitter_keeps_slow_drift():
    cfg = VideoImportConfig(static_threshold=2.0, static_frames=5, min_frames=2)
    stats = FileStats("x")
    splitter = EpisodeSplitter(cfg, stats)
    frames = [np.full((4, 4, 3), 100 + i, np.uint8) for i in range(12)]  # 1 level per frame: each step "static"
    done = [ep for f in frames for ep in splitter.push(f)] + splitter.finish()
    assert [len(e) for e in done] == [12] and stats.dropped_static == 0  # the anchor moves every 2 frames


def test_corrupt_files_are_reported_and_skipped(tmp_path, videos):
    data = videos["mp4"].read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.mp4").write_text("not a video\n" * 10)
    inputs = [str(videos["gif"]), str(tmp_path / "truncated.mp4"), str(tmp_path / "text.mp4"), str(tmp_path / "none.mp4")]
    result = CliRunner().invoke(main, ["data", "import", *inputs, "--out", str(tmp_path / "ds"), "--min-frames", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["imported_files"] == 1 and summary["frames"] == 20
    assert [r["file"] for r in summary["rejected"]] == inputs[1:] and all(r["reason"] for r in summary["rejected"])
    bad = ["data", "import", *inputs[1:], "--out", str(tmp_path / "bad"), "--quiet"]
    for args in (bad, ["data", "import", "--out", str(tmp_path / "x")], [*bad[:-1], "--fps", "0"],
                 ["data", "import", str(videos["gif"]), "--out", str(tmp_path / "ds")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and result.output.count("error: ") == 1, (args, result.output)
    assert not (tmp_path / "bad").exists()


def test_decoding_stops_at_a_broken_frame_and_keeps_the_rest(tmp_path):
    folder = write_pngs(tmp_path / "imgs", moving(20))
    (folder / "frame12.png").write_bytes(b"not a png")
    summary = import_videos([folder], tmp_path / "ds", CFG, progress=False)
    assert summary["frames"] == 12 and "frame12.png" in summary["truncated"][0]["reason"]


def test_deterministic(tmp_path, videos):
    inputs = [videos["pngs"], videos["mp4"], videos["gif"]]
    for name in ("a", "b"):
        import_videos(inputs, tmp_path / name, CFG, progress=False)
    for f in (tmp_path / "a").glob("*.npy"):
        assert filecmp.cmp(f, tmp_path / "b" / f.name, shallow=False)
    assert [e.meta["file"] for e in ShardedDataset(tmp_path / "a").episodes] == [str(p) for p in inputs]


def test_imported_data_trains(tmp_path, videos):
    root = tmp_path / "ds"
    import_videos([videos["mp4"], videos["gif"]], root, VideoImportConfig(height=16, width=16, min_frames=6), progress=False)
    batch = ShardedClips(root, clip_frames=6).batch(0, 4)
    assert batch.frames.shape == (4, 6, 16, 16, 3) and batch.actions is None
    world = apply_overrides(tiny(), ["data.source=shards", f"data.path={root}", "train_lam.steps=2", "train_lam.batch_size=2"])
    result = train("lam", world, tmp_path / "run", progress=False, tensorboard=False)
    assert result.step == 2 and all(np.isfinite(v) for v in result.logs.values())
