"""The serialisable state of one play session, and the bounded cache of what its history contributes."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from genie.nn.st_transformer import KVCache

STATE_FORMAT = 1


@dataclass(frozen=True)
class WorldState:
    """Everything needed to continue a session, and nothing derived: the K/V cache is rebuilt from it.

    `tokens` is the context window, oldest first; `actions[k]` is the latent action that led into frame k,
    -1 where there is none (prompt frames, and the first frame after the window slid).
    """

    session_id: str
    tokens: Tensor  # (t, N) int32 in [0, K), 1 <= t <= window
    actions: Tensor  # (t,) int32 in [-1, A)
    seed: int  # with `step`, fixes the sampling noise of every step
    version: int  # bumped by every step; compare-and-set key for stores, cache key with session_id
    step: int  # frames generated so far

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.actions.shape != (self.tokens.shape[0],):
            raise ValueError(f"bad state shapes: tokens {tuple(self.tokens.shape)}, actions {tuple(self.actions.shape)}")

    def to_bytes(self) -> bytes:
        meta = {"format": STATE_FORMAT, "session_id": self.session_id, "seed": self.seed}
        meta |= {"version": self.version, "step": self.step}
        tensors = {"tokens": self.tokens.to(torch.int32).contiguous(), "actions": self.actions.to(torch.int32).contiguous()}
        return st_save(tensors, metadata={"genie": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> WorldState:
        try:
            tensors = st_load(data)
            meta = json.loads(_metadata(data)["genie"])
        except Exception as exc:  # safetensors raises several types on garbage input
            raise ValueError(f"not a serialised WorldState: {exc}") from exc
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported WorldState format {meta.get('format')!r}, expected {STATE_FORMAT}")
        return cls(meta["session_id"], tensors["tokens"], tensors["actions"], meta["seed"], meta["version"], meta["step"])

    def equals(self, other: WorldState) -> bool:
        return (
            (self.session_id, self.seed, self.version, self.step) == (other.session_id, other.seed, other.version, other.step)
            and torch.equal(self.tokens, other.tokens)
            and torch.equal(self.actions, other.actions)
        )


def _metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__", {})


def digest(*tensors: Tensor) -> str:
    """A short content hash of tensors (dtype, shape and bytes): the key of soft caches."""
    h = hashlib.blake2b(digest_size=12)
    for t in tensors:
        t = t.contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


CacheKey = tuple[str, ...]  # (session id, ...): drop_session matches the first element


class KVCacheStore:
    """A bounded LRU of K/V caches keyed by (session id, part, content digest), capped in bytes.

    Soft state only: `take` removes the entry so a step owns it exclusively; a miss means the caller
    recomputes from the WorldState, which gives the same frames. A session has one live cache per part (its
    latest state's): putting a new one drops the session's older entry of that part, which no step can use
    any more (e.g. the cache of a window that has since slid), so stale entries never pile up to the cap.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[CacheKey, KVCache] = OrderedDict()
        self._slots: dict[CacheKey, CacheKey] = {}  # key[:-1] (session, part) -> its live key
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _remove(self, key: CacheKey) -> KVCache | None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item.nbytes()
            if self._slots.get(key[:-1]) == key:
                del self._slots[key[:-1]]
        return item

    def take(self, key: CacheKey) -> KVCache | None:
        with self._lock:
            item = self._remove(key)
            if item is None:
                self.misses += 1
            else:
                self.hits += 1
            return item

    def put(self, key: CacheKey, item: KVCache) -> None:
        size = item.nbytes()
        if size > self.max_bytes:
            return
        with self._lock:
            self._remove(key)
            superseded = self._slots.get(key[:-1])
            if superseded is not None:
                self._remove(superseded)
            self._items[key] = item
            self._slots[key[:-1]] = key
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._remove(next(iter(self._items)))

    def discard(self, key: CacheKey) -> None:
        with self._lock:
            self._remove(key)

    def drop_session(self, session_id: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == session_id]:
                self._remove(key)

    def items(self) -> list[tuple[CacheKey, KVCache]]:
        """A snapshot of the entries, least recently used first."""
        with self._lock:
            return list(self._items.items())

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes
