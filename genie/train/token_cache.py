"""Dynamics training on tokens and latent actions computed once for the dataset (`train_dynamics.encode_once`).

A dynamics step spends a fifth of its time encoding its clips with the frozen tokenizer and LAM (0.22 of 0.98 s on
the AVX2-only kind, demo-walk preset), and a 6,000-step run encodes 384k frames of a 169k-frame dataset. Encoding
each episode's windows once instead costs one pass over the dataset. Because the tokenizer's encoder is causal in
time, a frame's tokens depend on the frames before it in its clip: the cache therefore holds whole clip-length
windows (each episode cut at 0, T, 2T, ..., plus one window ending at its last frame), encoded exactly as the
training loop would encode them, and training draws whole windows. What changes against encoding every step is
only which clips exist: ~L/T windows per episode instead of L - T + 1 start positions.

The cache lives in the dynamics run directory (token-cache/): chunk files written atomically as they finish, so an
interrupted build resumes, and key.json naming the dataset and the exact tokenizer and LAM weights, so a cache
built from other weights or data is rebuilt rather than reused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from genie.catalog import file_sha256
from genie.data.shards import ShardedDataset
from genie.diskfull import disk_full_as_error
from genie.nn.vq import full_precision

log = logging.getLogger(__name__)
CACHE_FORMAT = 1
CHUNK_WINDOWS = 1024  # windows per chunk file: the unit an interrupted build resumes from
ENCODE_BATCH = 16  # windows encoded per forward pass


@dataclass(frozen=True)
class TokenBatch:
    """A dynamics training batch whose frames were encoded ahead of time."""

    tokens: Tensor  # (B, T, N) int64 tokenizer codes
    actions: Tensor  # (B, T-1) int64 latent actions of the frozen LAM

    def apply(self, fn: Callable[[Tensor], Tensor]) -> TokenBatch:
        return TokenBatch(fn(self.tokens), fn(self.actions))


def window_starts(lengths: list[int], clip_frames: int) -> list[tuple[int, int]]:
    """(episode, start) of every cached window: starts 0, T, 2T, ... and, when frames are left over, one window
    ending at the episode's last frame. Episodes shorter than T give none (as ShardedClips)."""
    out = []
    for ep, length in enumerate(lengths):
        if length < clip_frames:
            continue
        starts = list(range(0, length - clip_frames + 1, clip_frames))
        if starts[-1] != length - clip_frames:
            starts.append(length - clip_frames)
        out.extend((ep, s) for s in starts)
    return out


def cache_key(data: ShardedDataset, clip_frames: int, tokenizer_dir: Path, lam_dir: Path) -> dict:
    """What a cache was built from: reused only when all of it is the same."""
    return {"format": CACHE_FORMAT, "dataset": str(data.root.resolve()), "episodes": len(data.episodes),
            "frames": data.num_frames, "clip_frames": clip_frames,
            "tokenizer": file_sha256(Path(tokenizer_dir) / "model.safetensors"),
            "lam": file_sha256(Path(lam_dir) / "model.safetensors")}


class TokenCache:
    """A source of TokenBatch: batch(step) is a pure function of (seed, step), like ShardedClips."""

    def __init__(self, tokens: Tensor, actions: Tensor, seed: int = 0) -> None:
        if tokens.ndim != 3 or actions.shape != (tokens.shape[0], tokens.shape[1] - 1):
            raise ValueError(f"token cache shapes {tuple(tokens.shape)} / {tuple(actions.shape)} do not match")
        if tokens.shape[0] == 0:
            raise ValueError("the token cache holds no windows")
        self.tokens, self.actions, self.seed = tokens, actions, seed  # (W, T, N), (W, T-1) int32, int16

    @property
    def num_windows(self) -> int:
        return self.tokens.shape[0]

    def batch(self, step: int, batch_size: int) -> TokenBatch:
        return self.batch_rows(step, batch_size, 0, batch_size)

    def batch_rows(self, step: int, batch_size: int, start: int, stop: int) -> TokenBatch:
        """Rows [start, stop) of batch(step, batch_size)."""
        rng = np.random.default_rng([self.seed, step])
        picks = torch.from_numpy(rng.integers(0, self.num_windows, size=batch_size)[start:stop])
        return TokenBatch(self.tokens[picks].long(), self.actions[picks].long())


def build_token_cache(out: Path, dataset: Path, clip_frames: int, tokenizer_dir: Path, lam_dir: Path,
                      tokenizer: nn.Module, lam: nn.Module, device: torch.device, seed: int = 0,
                      progress: bool = False) -> TokenCache:
    """The cache of `dataset`'s windows under `out`: loaded when complete and built from the same inputs, else built
    (resuming from the chunks an interrupted build finished). `tokenizer`/`lam` are the frozen models loaded from
    `tokenizer_dir`/`lam_dir`; `progress` shows a bar while windows are encoded (minutes on a CPU)."""
    out = Path(out)
    data = ShardedDataset(dataset)
    key = cache_key(data, clip_frames, tokenizer_dir, lam_dir)
    key_file = out / "key.json"
    if key_file.exists() and json.loads(key_file.read_text()) != key:
        log.warning("token cache %s was built from other data or weights: rebuilding it", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not key_file.exists():
        key_file.write_text(json.dumps(key, indent=2))
    windows = window_starts([e.length for e in data.episodes], clip_frames)
    if not windows:
        raise ValueError(f"{dataset}: no episode has {clip_frames} frames")
    t0, built = time.perf_counter(), 0
    chunks = []
    starts = range(0, len(windows), CHUNK_WINDOWS)
    paths = [out / f"chunk-{c:05d}.safetensors" for c in range(len(starts))]
    todo = sum(min(CHUNK_WINDOWS, len(windows) - lo) for lo, path in zip(starts, paths, strict=True) if not path.exists())
    bar = tqdm(total=todo, desc="encode dataset", unit="clip", disable=not progress or todo == 0)
    for lo, path in zip(starts, paths, strict=True):
        if not path.exists():
            part = _encode_windows(data, windows[lo : lo + CHUNK_WINDOWS], clip_frames, tokenizer, lam, device)
            tmp = path.with_suffix(".tmp")
            with disk_full_as_error(path, "token cache chunk", cleanup=tmp):
                save_file(part, str(tmp))
                os.replace(tmp, path)
            built += 1
            bar.update(part["tokens"].shape[0])
        chunks.append(load_file(path))
    bar.close()
    if built:
        log.info("token cache: encoded %d windows of %d frames (%d chunks) in %.0f s", len(windows), clip_frames,
                 built, time.perf_counter() - t0)
    tokens = torch.cat([c["tokens"] for c in chunks])  # (W, T, N)
    actions = torch.cat([c["actions"] for c in chunks])  # (W, T-1)
    return TokenCache(tokens, actions, seed)


def _encode_windows(data: ShardedDataset, windows: list[tuple[int, int]], clip_frames: int, tokenizer: nn.Module,
                    lam: nn.Module, device: torch.device) -> dict[str, Tensor]:
    tokens, actions = [], []
    for lo in range(0, len(windows), ENCODE_BATCH):
        frames = np.stack([data.clip(ep, s, clip_frames)[0] for ep, s in windows[lo : lo + ENCODE_BATCH]])
        video = torch.from_numpy(frames).to(device)  # (b, T, H, W, C) uint8
        # fp32 as the training loop encodes (and as a world encodes at inference), under any autocast.
        with torch.no_grad(), full_precision(device):
            tokens.append(tokenizer.encode(video).to("cpu", torch.int32))  # (b, T, N)
            actions.append(lam.infer_actions(video).to("cpu", torch.int16))  # (b, T-1)
    return {"tokens": torch.cat(tokens).contiguous(), "actions": torch.cat(actions).contiguous()}
