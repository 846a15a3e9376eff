import numpy as np
import pytest

from genie.config import DataConfig
from genie.data import make_source
from genie.data.shards import ShardedClips, ShardedDataset, ShardWriter


def _episode(n, value):
    frames = np.full((n, 8, 8, 3), value, dtype=np.uint8)
    frames[:, 0, 0, 0] = np.arange(n)  # frame index written into the pixels
    return frames, np.arange(n - 1) % 5


def _write(tmp_path, lengths, per_shard=10):
    w = ShardWriter(tmp_path / "ds", frames_per_shard=per_shard)
    for i, n in enumerate(lengths):
        f, a = _episode(n, i)
        w.add(f, a, {"episode": i})
    w.close({"source": "test"})
    return tmp_path / "ds"


def test_round_trip_across_shards(tmp_path):
    root = _write(tmp_path, [6, 7, 3, 12])
    ds = ShardedDataset(root)
    assert len(ds.episodes) == 4 and ds.num_frames == 28
    assert len(list(root.glob("frames-*.npy"))) == 3  # shards of <= 10 frames: [6] [7, 3] [12 (alone, oversized)]
    for i, n in enumerate([6, 7, 3, 12]):
        frames, actions = ds.episode(i)
        assert frames.shape == (n, 8, 8, 3) and (frames[:, 1, 1] == i).all()
        assert list(frames[:, 0, 0, 0]) == list(range(n)) and list(actions) == list(np.arange(n - 1) % 5)
    assert isinstance(np.load(root / "frames-00000.npy", mmap_mode="r"), np.memmap)


def test_clips_are_deterministic_and_stay_inside_episodes(tmp_path):
    root = _write(tmp_path, [6, 7, 3, 12])
    src = ShardedClips(root, clip_frames=5, seed=1)
    assert src.num_clips == 2 + 3 + 0 + 8
    b1, b2 = src.batch(3, 16), src.batch(3, 16)
    assert b1.frames.shape == (16, 5, 8, 8, 3) and b1.actions.shape == (16, 4)
    assert np.array_equal(b1.frames, b2.frames)
    idx = b1.frames[:, :, 0, 0, 0].numpy().astype(int)  # consecutive frame numbers of one episode
    assert (np.diff(idx, axis=1) == 1).all()
    assert (b1.frames[:, :, 1, 1, 0] == b1.frames[:, :1, 1, 1, 0]).all()  # never crosses an episode
    assert not np.array_equal(src.batch(4, 16).frames, b1.frames)


def test_errors(tmp_path):
    root = _write(tmp_path, [3])
    with pytest.raises(ValueError, match="no episode has 5 frames"):
        ShardedClips(root, clip_frames=5)
    with pytest.raises(ValueError, match="already holds a dataset"):
        ShardWriter(root)
    with pytest.raises(ValueError, match="not a Genie dataset"):
        ShardedDataset(tmp_path / "nothing")
    w = ShardWriter(tmp_path / "other")
    with pytest.raises(ValueError, match="need 2 actions"):
        w.add(np.zeros((3, 8, 8, 3), np.uint8), np.zeros(1), {})
    with pytest.raises(ValueError, match="uint8"):
        w.add(np.zeros((3, 8, 8, 3), np.float32), None, {})
    cfg = DataConfig(source="shards", path=str(_write(tmp_path / "x", [9])), height=16, width=16, frames=4)
    with pytest.raises(ValueError, match="config expects"):
        make_source(cfg)
    with pytest.raises(ValueError, match="needs data.path"):
        DataConfig(source="shards")
