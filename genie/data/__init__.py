"""Video sources for training and evaluation."""

from __future__ import annotations

from pathlib import Path

from genie.data.shards import ShardedClips, ShardedDataset, ShardWriter
from genie.data.source import VideoBatch, VideoSource
from genie.data.synthetic import MovingSprites, SpritesConfig

__all__ = ["MovingSprites", "ShardWriter", "ShardedClips", "ShardedDataset", "SpritesConfig", "VideoBatch",
           "VideoSource", "make_source"]


def make_source(data, evaluation: bool = False) -> VideoSource:
    """The VideoSource a DataConfig describes: training clips, or held-out clips when `evaluation`."""
    if data.source == "sprites":
        return MovingSprites(data.sprites(evaluation))
    path = data.eval_path if evaluation else data.path
    if not path:
        raise ValueError("evaluation on shards needs data.eval_path (a held-out split from `genie data generate`)")
    clips = ShardedClips(Path(path), data.frames, seed=data.seed + (1 if evaluation else 0))
    expected = (data.height, data.width, 3)
    if tuple(clips.data.frame_shape) != expected:
        raise ValueError(f"{path} holds {clips.data.frame_shape} frames, the config expects {expected}")
    return clips
