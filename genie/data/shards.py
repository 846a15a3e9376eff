"""Sharded, memory-mappable episode storage and the clip sampler that trains on it.

A dataset directory holds:
    index.json             format, source description, frame shape, and every episode's shard, start, length
    frames-NNNNN.npy       (F, H, W, C) uint8, episodes stored back to back (np.load(..., mmap_mode="r"))
    actions-NNNNN.npy      (F,) int16: actions[k] is the true action taken after frame k, -1 after an episode's
                           last frame (and everywhere for sources without actions, e.g. imported video)
Shards are written under temporary names and renamed, and index.json is written last, so a directory with an
index is always complete; a full disk removes what the writer wrote (DiskFull).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genie.data.source import VideoBatch
from genie.diskfull import DiskFull, disk_full_as_error

INDEX_FORMAT = 1


@dataclass(frozen=True)
class Episode:
    shard: int
    start: int
    length: int
    meta: dict[str, Any]


class ShardWriter:
    """Appends episodes to fixed-size shards; `close(extra)` writes the index."""

    def __init__(self, out: Path, frames_per_shard: int = 4096) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        if (self.out / "index.json").exists():
            raise ValueError(f"{self.out} already holds a dataset (index.json); choose a new --out")
        self.frames_per_shard = frames_per_shard
        self.episodes: list[Episode] = []
        self._frames: list[np.ndarray] = []
        self._actions: list[np.ndarray] = []
        self._count = 0
        self._shard = 0
        self.frame_shape: tuple[int, ...] | None = None
        self.total_frames = 0

    def add(self, frames: np.ndarray, actions: np.ndarray | None, meta: dict[str, Any]) -> None:
        """frames: (F, H, W, C) uint8; actions: (F-1,) ints (the action after each frame but the last) or None."""
        if frames.ndim != 4 or frames.dtype != np.uint8:
            raise ValueError(f"expected (F, H, W, C) uint8 frames, got {frames.shape} {frames.dtype}")
        if self.frame_shape is None:
            self.frame_shape = tuple(frames.shape[1:])
        elif tuple(frames.shape[1:]) != self.frame_shape:
            raise ValueError(f"frame shape {frames.shape[1:]} differs from the dataset's {self.frame_shape}")
        acts = np.full(len(frames), -1, dtype=np.int16)
        if actions is not None:
            if len(actions) != len(frames) - 1:
                raise ValueError(f"need {len(frames) - 1} actions for {len(frames)} frames, got {len(actions)}")
            acts[:-1] = actions
        if self._count and self._count + len(frames) > self.frames_per_shard:
            self._flush()
        self.episodes.append(Episode(self._shard, self._count, len(frames), meta))
        self._frames.append(frames)
        self._actions.append(acts)
        self._count += len(frames)
        self.total_frames += len(frames)

    def _flush(self) -> None:
        if not self._frames:
            return
        for name, parts in (("frames", self._frames), ("actions", self._actions)):
            final = self.out / f"{name}-{self._shard:05d}.npy"
            tmp = final.with_name(f".tmp-{final.name}")
            with self._guard(tmp):
                with open(tmp, "wb") as fh:
                    np.save(fh, np.concatenate(parts))
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, final)
        self._frames, self._actions, self._count = [], [], 0
        self._shard += 1

    def close(self, info: dict[str, Any]) -> Path:
        self._flush()
        index = {
            "format": INDEX_FORMAT,
            "info": info,
            "frame_shape": list(self.frame_shape or ()),
            "num_frames": self.total_frames,
            "episodes": [{"shard": e.shard, "start": e.start, "length": e.length, **e.meta} for e in self.episodes],
        }
        tmp = self.out / ".tmp-index.json"
        with self._guard(tmp):
            tmp.write_text(json.dumps(index))
            os.replace(tmp, self.out / "index.json")
        return self.out / "index.json"

    @contextlib.contextmanager
    def _guard(self, tmp: Path) -> Iterator[None]:
        """A full disk while writing `tmp` removes every shard this writer wrote (a dataset without its index is
        not one, and its shards hold the space that ran out) and raises DiskFull; a re-run starts it again."""
        try:
            with disk_full_as_error(self.out, "dataset", cleanup=tmp):
                yield
        except DiskFull:
            self.abort()
            raise

    def abort(self) -> None:
        """Removes the shards written so far (and the directory, when that leaves it empty)."""
        for shard in range(self._shard + 1):
            for name in ("frames", "actions"):
                for path in (self.out / f"{name}-{shard:05d}.npy", self.out / f".tmp-{name}-{shard:05d}.npy"):
                    path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.out.rmdir()


class ShardedDataset:
    """Read side: memory-maps the shards of a dataset directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            index = json.loads((self.root / "index.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.root} is not a Genie dataset (index.json): {exc}") from exc
        if index.get("format") != INDEX_FORMAT:
            raise ValueError(f"{self.root}: unsupported dataset format {index.get('format')!r}")
        self.info: dict[str, Any] = index["info"]
        self.frame_shape = tuple(index["frame_shape"])
        self.episodes = [Episode(e["shard"], e["start"], e["length"], e) for e in index["episodes"]]
        self._maps: dict[tuple[str, int], np.ndarray] = {}

    def _map(self, name: str, shard: int) -> np.ndarray:
        key = (name, shard)
        if key not in self._maps:
            self._maps[key] = np.load(self.root / f"{name}-{shard:05d}.npy", mmap_mode="r")
        return self._maps[key]

    def episode(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Frames (F, H, W, C) uint8 and actions (F-1,) int64 (-1 where unknown) of episode i."""
        return self.clip(i, 0, self.episodes[i].length)

    def clip(self, i: int, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        e = self.episodes[i]
        if start < 0 or start + length > e.length:
            raise ValueError(f"clip [{start}, {start + length}) is outside episode {i} of {e.length} frames")
        lo = e.start + start
        frames = np.asarray(self._map("frames", e.shard)[lo : lo + length])
        actions = self._map("actions", e.shard)[lo : lo + length - 1].astype(np.int64)
        return frames, actions

    @property
    def num_frames(self) -> int:
        return sum(e.length for e in self.episodes)

    @property
    def true_action_names(self) -> list[str] | None:
        """Human-readable names of the true actions (index.json info "action_names"), None if not recorded (old
        datasets, sources without them)."""
        names = self.info.get("action_names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return None
        return list(names)


class ShardedClips:
    """A VideoSource of fixed-length clips: batch(step) is a pure function of (seed, step)."""

    def __init__(self, root: Path, clip_frames: int, seed: int = 0) -> None:
        self.data = ShardedDataset(root)
        self.clip_frames = clip_frames
        self.seed = seed
        starts = np.array([max(0, e.length - clip_frames + 1) for e in self.data.episodes], dtype=np.int64)
        if starts.sum() == 0:
            raise ValueError(f"{root}: no episode has {clip_frames} frames")
        self._cum = np.cumsum(starts)  # clip k lives in the episode where cum first exceeds k

    @property
    def num_clips(self) -> int:
        return int(self._cum[-1])

    @property
    def true_action_names(self) -> list[str] | None:
        """Names of the dataset's true actions, None when it does not record them."""
        return self.data.true_action_names

    def clip_at(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        ep = int(np.searchsorted(self._cum, k, side="right"))
        start = k - (int(self._cum[ep - 1]) if ep else 0)
        return self.data.clip(ep, start, self.clip_frames)

    def batch(self, step: int, batch_size: int) -> VideoBatch:
        return self.batch_rows(step, batch_size, 0, batch_size)

    def batch_rows(self, step: int, batch_size: int, start: int, stop: int) -> VideoBatch:
        """Rows [start, stop) of batch(step, batch_size), reading only their clips."""
        rng = np.random.default_rng([self.seed, step])
        picks = rng.integers(0, self.num_clips, size=batch_size)[start:stop]
        clips = [self.clip_at(int(k)) for k in picks]
        frames = torch.from_numpy(np.stack([f for f, _ in clips]))
        actions = torch.from_numpy(np.stack([a for _, a in clips]))
        return VideoBatch(frames=frames, actions=None if (actions < 0).all() else actions)
