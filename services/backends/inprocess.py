"""The embedded default model backend: the world's models in this process, micro-batched on one thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from genie.config import WorldConfig
from genie.sampling import DynamicsEngine, FrameDecoder, SamplingConfig
from genie.spec import WorldSpec, world_spec_of
from genie.state import WorldState
from genie.train.checkpoint import load_model
from genie.worlds import load_world_config_of
from services.backends.backend import check_frames, check_state
from services.backends.batcher import MicroBatcher

_MODEL_THREAD: ThreadPoolExecutor | None = None
_MODEL_THREAD_LOCK = threading.Lock()


def model_thread() -> ThreadPoolExecutor:
    """The one thread of this process that runs torch, shared by every in-process backend (every world version a
    catalogue loads). torch's OpenMP (libgomp) gives each calling thread a team of its own, and two teams on the same
    cores halve both, even while one is idle (measured on the 2-core AVX-512 kind: 64 -> 135 ms a step with a second
    loaded version, 34 -> 61 ms a dynamics call with a team left on the main thread). One thread also serialises
    the versions' model calls, which is what the cores could do anyway."""
    global _MODEL_THREAD
    with _MODEL_THREAD_LOCK:
        if _MODEL_THREAD is None:
            _MODEL_THREAD = ThreadPoolExecutor(1, thread_name_prefix="genie-model")
        return _MODEL_THREAD


class InProcessBackend:
    """Loads a world directory and serves it from this process (CPU or one GPU: `device`, `precision`).

    All model calls run on the process's model thread (`model_thread()`; torch's own threads do the maths);
    concurrent calls of the same kind are batched across sessions by a MicroBatcher. The K/V caches are soft state,
    as in Triton.
    """

    def __init__(self, world_dir: Path, max_batch: int = 16, max_wait_s: float = 0.002, cache_bytes: int = 1 << 30,
                 threads: int = 0, device: str = "auto", precision: str = "auto") -> None:
        self.world_dir = Path(world_dir)
        self.max_batch, self.max_wait_s, self.cache_bytes, self.threads = max_batch, max_wait_s, cache_bytes, threads
        self.device, self.precision = device, precision
        self.spec: WorldSpec | None = None
        self._executor = model_thread()
        self._batchers: list[MicroBatcher] = []

    async def start(self) -> None:
        if self.spec is not None:
            return
        cfg = load_world_config_of(self.world_dir)
        spec = world_spec_of(self.world_dir)  # fails before loading models if actions.json is malformed
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load, cfg)
        self.spec = spec

    def _load(self, cfg: WorldConfig) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        self.engine = DynamicsEngine(load_model(self.world_dir / "dynamics", "dynamics"), cfg.sampling.keep_frames,
                                     self.cache_bytes, self.device, self.precision)
        self.decoder = FrameDecoder(load_model(self.world_dir / "tokenizer", "tokenizer"), self.cache_bytes, self.device,
                                    self.precision)
        # fp32 whatever the precision: the LAM's nearest-code search must not flip with rounding
        self.lam = load_model(self.world_dir / "lam", "lam").eval().to(self.engine.device)
        if self.cache_bytes > 0:  # a budget that cannot hold one batch is refused here (0: no caching between steps)
            self.engine.pool.require(self.max_batch, "dynamics")
            self.decoder.pool.require(self.max_batch, "decoder")
        make = lambda fn: MicroBatcher(fn, self._executor, self.max_batch, self.max_wait_s)  # noqa: E731
        self._next = make(self._next_batch)
        self._decode = make(self._decode_batch)
        self._batchers = [self._next, self._decode]

    def _next_batch(self, items: Sequence[tuple[WorldState, int, SamplingConfig]]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(items)
        groups: dict[SamplingConfig, list[int]] = {}
        for i, (_, _, sampling) in enumerate(items):
            groups.setdefault(sampling, []).append(i)
        for sampling, idx in groups.items():  # one batched call per distinct sampling setting
            tokens = self.engine.next_tokens([items[i][0] for i in idx], [items[i][1] for i in idx], sampling)
            for i, row in zip(idx, tokens.numpy(), strict=True):
                out[i] = row
        return out

    def _decode_batch(self, states: Sequence[WorldState]) -> list[np.ndarray]:
        return list(self.decoder.decode_last(states).numpy())

    def _check_started(self) -> WorldSpec:
        if self.spec is None:
            raise RuntimeError("InProcessBackend.start() was not awaited")
        return self.spec

    async def encode(self, frames: np.ndarray) -> np.ndarray:
        spec = self._check_started()
        check_frames(frames, spec, 1, spec.window)
        video = torch.from_numpy(np.array(frames))[None]  # a writable copy
        run = lambda: self.decoder.encode(video)[0].numpy()  # noqa: E731
        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def next_tokens(self, state: WorldState, action: int, sampling: SamplingConfig) -> np.ndarray:
        spec = self._check_started()
        if not 0 <= int(action) < spec.num_actions:
            raise ValueError(f"action {action} is out of range [0, {spec.num_actions})")
        check_state(state, spec)
        return await self._next.submit((state, int(action), sampling))

    async def decode_last(self, state: WorldState) -> np.ndarray:
        check_state(state, self._check_started())
        return await self._decode.submit(state)

    async def infer_actions(self, frames: np.ndarray) -> np.ndarray:
        spec = self._check_started()
        check_frames(frames, spec, 2, self.lam.cfg.max_frames)
        video = torch.from_numpy(np.array(frames))[None]  # a writable copy
        run = lambda: self.lam.infer_actions(video.to(self.engine.device))[0].to('cpu', torch.int32).numpy()  # noqa: E731
        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def ready(self) -> bool:
        return self.spec is not None

    async def close(self) -> None:
        for b in self._batchers:
            await b.close()
