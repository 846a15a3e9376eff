"""Imports real video (mp4, webm, mkv, gif, ..., or a folder of numbered images) into the sharded dataset format.

Each input is decoded with PyAV (which bundles FFmpeg) and goes through four steps, all on the output frames:
  1. Resample to `fps` by timestamp: an output slot k (time k/fps from the first frame) takes the first source
     frame at or after it. Frames are never duplicated, so a source slower than `fps` keeps its own frames.
  2. Fit to `height` x `width`: scale (FFmpeg area filter) until the frame covers the target, centre-crop the rest.
  3. Drop static stretches: a frame is a near-duplicate when its mean absolute difference (uint8 units, over all
     pixels and channels) from the stretch's first frame is below `static_threshold`. Comparing with that anchor
     and not with the previous frame keeps slow pans, whose small steps add up. A stretch of at least
     `static_frames` near-duplicates is dropped and ends the episode; shorter pauses are kept.
  4. Split into episodes: at a scene cut (mean absolute difference from the previous frame >= `scene_cut`), after
     a dropped static stretch, and every `max_frames` frames. Episodes shorter than `min_frames` are dropped.
Video has no true actions, so episodes are written with actions=None (stored as -1, read back as
`VideoBatch.actions=None`): training needs none (the LAM infers them), and evaluation skips action consistency.
Files are processed in the order given (directories in sorted order), in one process, so the output depends only on
the inputs and the config. A file that cannot be read is reported in the summary and skipped.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from genie.data.shards import ShardWriter

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".gif", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".ogv"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
SLOT_TOLERANCE = 0.01  # of an output frame: timestamps rounded a little early still fill their slot


@dataclass(frozen=True)
class VideoImportConfig:
    fps: float = 10.0  # output frame rate
    height: int = 64
    width: int = 64
    static_threshold: float = 2.0  # mean |difference| in uint8 units below which a frame repeats its anchor; 0 = off
    static_frames: int = 10  # near-duplicates in a row (at the output rate) that make a dropped static stretch
    scene_cut: float = 50.0  # mean |difference| from the previous frame that starts a new episode; 0 = off
    min_frames: int = 16  # shorter episodes are dropped: a training clip needs T frames
    max_frames: int = 500  # episodes are cut here
    image_fps: float = 0.0  # frame rate of image folders; 0 = the output fps (every image kept)

    def __post_init__(self) -> None:
        if not self.fps > 0 or self.image_fps < 0:
            raise ValueError(f"need fps > 0 and image_fps >= 0, got {self.fps}, {self.image_fps}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"need a positive frame size, got {self.height}x{self.width}")
        if self.static_threshold < 0 or self.scene_cut < 0 or self.static_frames < 1:
            raise ValueError("need static_threshold >= 0, scene_cut >= 0 and static_frames >= 1")
        if not 2 <= self.min_frames <= self.max_frames:
            raise ValueError(f"need 2 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")


@dataclass
class FileStats:
    file: str
    source_frames: int = 0  # decoded
    seconds: float = 0.0  # of source video
    sampled: int = 0  # after resampling to fps
    dropped_static: int = 0
    dropped_short: int = 0  # in episodes shorter than min_frames
    episodes: int = 0
    frames: int = 0  # written
    error: str = ""  # why decoding stopped early (the frames before it are kept)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two int16 frames, in uint8 units."""
    return float(np.abs(a - b).mean())


class EpisodeSplitter:
    """Consumes fitted frames one by one and returns finished episodes (steps 3 and 4 of the module docstring)."""

    def __init__(self, cfg: VideoImportConfig, stats: FileStats) -> None:
        self.cfg, self.stats = cfg, stats
        self.cur: list[np.ndarray] = []  # the episode being built
        self.pending: list[np.ndarray] = []  # near-duplicates of the anchor, not yet known to be a long stretch
        self.anchor: np.ndarray | None = None  # int16 copy of the last frame that moved
        self.prev: np.ndarray | None = None  # int16 copy of the last frame seen
        self.in_static = False

    def push(self, frame: np.ndarray) -> list[np.ndarray]:
        cfg = self.cfg
        f16 = frame.astype(np.int16)
        prev, self.prev = self.prev, f16
        if prev is not None and cfg.scene_cut and _mad(f16, prev) >= cfg.scene_cut:
            done = self.finish()
            self.in_static = False
            self.anchor = f16
            return done + self._extend([frame])
        if self.anchor is not None and cfg.static_threshold and _mad(f16, self.anchor) < cfg.static_threshold:
            if self.in_static:
                self.stats.dropped_static += 1
                return []
            self.pending.append(frame)
            if len(self.pending) < cfg.static_frames:
                return []
            self.stats.dropped_static += len(self.pending)
            self.pending, self.in_static = [], True
            return self._end()
        self.in_static = False
        self.anchor = f16
        pending, self.pending = self.pending, []
        return self._extend([*pending, frame])

    def finish(self) -> list[np.ndarray]:
        """Ends the current episode (a short pause at its end is kept)."""
        pending, self.pending = self.pending, []
        return self._extend(pending) + self._end()

    def _extend(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        done = []
        for f in frames:
            self.cur.append(f)
            if len(self.cur) == self.cfg.max_frames:
                done += self._end()
        return done

    def _end(self) -> list[np.ndarray]:
        cur, self.cur = self.cur, []
        if len(cur) >= self.cfg.min_frames:
            return [np.stack(cur)]
        self.stats.dropped_short += len(cur)
        return []


class _Resampler:
    """Keeps the first frame at or after each output slot k/fps (times relative to the first frame)."""

    def __init__(self, fps: float) -> None:
        self.fps, self.next_slot, self.t0 = fps, 0, None

    def keep(self, t: float) -> bool:
        if self.t0 is None:
            self.t0 = t
        pos = (t - self.t0) * self.fps
        if pos + SLOT_TOLERANCE < self.next_slot:
            return False
        self.next_slot = math.floor(pos + SLOT_TOLERANCE) + 1
        return True


def _fit(frame: Any, height: int, width: int) -> np.ndarray:
    """An av.VideoFrame -> (height, width, 3) uint8: scaled (area filter) to cover the target, then centre-cropped."""
    w, h = frame.width, frame.height
    s = max(width / w, height / h)
    sw, sh = max(width, round(w * s)), max(height, round(h * s))
    img = frame.reformat(width=sw, height=sh, format="rgb24", interpolation="AREA").to_ndarray()
    y, x = (sh - height) // 2, (sw - width) // 2
    return np.ascontiguousarray(img[y : y + height, x : x + width])


def _decode_video(path: Path, cfg: VideoImportConfig, stats: FileStats) -> Iterator[np.ndarray]:
    import av  # optional at import time, like procgen: only the importer needs FFmpeg

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 30)
        resampler, first, last = _Resampler(cfg.fps), None, None
        for i, frame in enumerate(container.decode(stream)):
            t = frame.time if frame.time is not None else i / rate
            first = t if first is None else first
            last = t
            stats.source_frames += 1
            stats.seconds = last - first + 1 / rate
            if resampler.keep(t):
                stats.sampled += 1
                yield _fit(frame, cfg.height, cfg.width)


def _natural_key(p: Path) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)]


def _decode_images(folder: Path, cfg: VideoImportConfig, stats: FileStats) -> Iterator[np.ndarray]:
    import av
    from PIL import Image

    rate = cfg.image_fps or cfg.fps
    resampler = _Resampler(cfg.fps)
    for i, p in enumerate(sorted(_images(folder), key=_natural_key)):
        stats.source_frames += 1
        stats.seconds = (i + 1) / rate
        if resampler.keep(i / rate):
            with Image.open(p) as im:
                rgb = np.asarray(im.convert("RGB"))
            stats.sampled += 1
            yield _fit(av.VideoFrame.from_ndarray(rgb, format="rgb24"), cfg.height, cfg.width)


def _images(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Files as given (any suffix), image folders as one input each, other folders as their videos, sorted by name."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir() and not _images(p):
            inner = sorted(q for q in p.iterdir() if q.is_dir() or q.suffix.lower() in VIDEO_SUFFIXES)
            out += expand_inputs(inner)
        elif p not in out:
            out.append(p)
    return out


def import_videos(inputs: list[Path], out: Path, cfg: VideoImportConfig, progress: bool = True) -> dict[str, Any]:
    """Imports `inputs` into the new dataset directory `out` and returns the summary; raises ValueError if nothing
    could be imported (no directory is written then)."""
    out = Path(out)
    if (out / "index.json").exists():
        raise ValueError(f"{out} already holds a dataset (index.json); choose a new --out")
    files = expand_inputs([Path(p) for p in inputs])
    if not files:
        raise ValueError("no input videos")
    t0 = time.perf_counter()
    writer: ShardWriter | None = None
    all_stats, rejected = [], []
    bar = tqdm(files, desc="import", disable=not progress, unit="file")
    for idx, path in enumerate(bar):
        stats = FileStats(str(path))
        splitter = EpisodeSplitter(cfg, stats)
        frames = _decode_images(path, cfg, stats) if path.is_dir() else _decode_video(path, cfg, stats)
        for frame in _guarded(frames, stats):
            for ep in splitter.push(frame):
                writer = _write(writer, out, ep, idx, stats)
        for ep in splitter.finish():
            writer = _write(writer, out, ep, idx, stats)
        all_stats.append(stats)
        if not stats.episodes:
            reason = stats.error or (f"no episode of >= {cfg.min_frames} frames ({stats.sampled} frames at {cfg.fps:g} fps, "
                                     f"{stats.dropped_static} static)")
            rejected.append({"file": str(path), "reason": reason})
        bar.set_postfix(frames=writer.total_frames if writer else 0, rejected=len(rejected))
    bar.close()
    if writer is None:
        reasons = "; ".join(f"{r['file']}: {r['reason']}" for r in rejected[:3])
        raise ValueError(f"nothing imported from {len(files)} file(s): {reasons}" + (" ..." if len(rejected) > 3 else ""))
    summary = _summary(files, all_stats, rejected, writer, out, time.perf_counter() - t0)
    info = {"source": "video", "config": asdict(cfg), "num_true_actions": 0,
            "summary": {k: v for k, v in summary.items() if k != "seconds"},
            "files": [asdict(s) for s in all_stats if s.episodes]}
    writer.close(info)
    return summary


def _guarded(frames: Iterator[np.ndarray], stats: FileStats) -> Iterator[np.ndarray]:
    """Yields frames until the decoder fails, then records why in stats.error (the frames before it are kept)."""
    try:
        yield from frames
    except Exception as exc:  # a corrupt file may fail anywhere in FFmpeg or Pillow: report it, never abort the import
        stats.error = f"{type(exc).__name__}: {exc}"
        log.info("%s: %s", stats.file, stats.error)


def _write(writer: ShardWriter | None, out: Path, frames: np.ndarray, file_index: int, stats: FileStats) -> ShardWriter:
    writer = writer or ShardWriter(out)
    writer.add(frames, None, {"file": stats.file, "file_index": file_index, "episode_in_file": stats.episodes})
    stats.episodes += 1
    stats.frames += len(frames)
    return writer


def _summary(files: list[Path], stats: list[FileStats], rejected: list[dict], writer: ShardWriter, out: Path,
             seconds: float) -> dict[str, Any]:
    """Totals over every input that decoded (rejected ones too); frames/episodes are what was written."""
    return {
        "out": str(out),
        "files": len(files),
        "imported_files": sum(1 for s in stats if s.episodes),
        "rejected": rejected,
        "truncated": [{"file": s.file, "reason": s.error} for s in stats if s.error and s.episodes],
        "episodes": len(writer.episodes),
        "frames": writer.total_frames,
        "source_frames": sum(s.source_frames for s in stats),
        "source_hours": round(sum(s.seconds for s in stats) / 3600, 6),
        "sampled_frames": sum(s.sampled for s in stats),
        "dropped_static": sum(s.dropped_static for s in stats),
        "dropped_short": sum(s.dropped_short for s in stats),
        "seconds": round(seconds, 2),
    }
