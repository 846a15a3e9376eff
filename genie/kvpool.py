"""A pool of per-session K/V caches in preallocated slots on the engine's device, indexed by content.

A step takes the slots of its sessions: a hit is a slot that already holds the session's history, a miss a free
(or least recently used) slot that the caller fills from the session's tokens. The step reads and writes the slots
in place and gives them back under the key of the state they now hold. Nothing is copied in or out when the batch's
slots are one contiguous run (always at B=1); otherwise the step's batch view is one gather of its slots, and
its commits are written through to the slots.

Soft state only: a miss recomputes from the WorldState with identical results, so the pool may forget anything.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from genie.nn.st_transformer import KVCache, STTransformerConfig

CacheKey = tuple[str, ...]  # (session id, part, content digest)


class KVPool:
    """Slots of shape (L, P, N, heads, T, dh) for keys and values; at most `max_bytes` of them (at least one batch).

    The tensors grow by doubling up to the cap, so a small world or a test allocates little; growing replaces them,
    so one engine runs one step at a time over its pool. A session has one live
    slot per part: giving a slot back under a new key frees the session's older slot of that part.
    """

    def __init__(self, cfg: STTransformerConfig, tokens: int, max_bytes: int = 1 << 30, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, initial_slots: int = 4) -> None:
        self.cfg, self.tokens, self.device, self.dtype = cfg, tokens, torch.device(device), dtype
        self.slot_bytes = 2 * cfg.depth * tokens * cfg.dim * cfg.max_frames * torch.empty(0, dtype=dtype).element_size()
        self.max_slots = max(1, max_bytes // self.slot_bytes)
        self.k = self.v = torch.empty(0)
        self._allocate(min(initial_slots, self.max_slots))
        self._index: OrderedDict[CacheKey, int] = OrderedDict()  # idle slots by content, least recently used first
        self._live: dict[CacheKey, CacheKey] = {}  # (session, part) -> its indexed key
        self._lock = threading.Lock()
        self.hits = self.misses = self.gathers = 0

    def require(self, batch: int, what: str) -> None:
        """Raises ValueError, naming the budget, when a batch of `batch` sessions cannot fit in `max_bytes` (the pool
        would otherwise grow past its budget to run it); below that, the budget evicts idle caches (LRU)."""
        if batch > self.max_slots:
            mib = self.max_slots * self.slot_bytes / 2**20
            raise ValueError(f"the {what} K/V cache budget holds {self.max_slots} sessions ({self.slot_bytes / 2**20:.1f} "
                             f"MiB each, {mib:.0f} MiB), fewer than a batch of {batch}: raise the cache budget to at "
                             f"least {batch * self.slot_bytes / 2**20:.0f} MiB or lower the batch size")

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def _allocate(self, slots: int) -> None:
        dh = self.cfg.dim // self.cfg.heads
        shape = (self.cfg.depth, slots, self.tokens, self.cfg.heads, self.cfg.max_frames, dh)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)  # zeros: an unused slot is finite
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        old = self.k.shape[1] if self.k.ndim == 6 else 0
        if old:
            k[:, :old], v[:, :old] = self.k, self.v
        self.k, self.v = k, v
        self._free = list(range(old, slots)) + (self._free if old else [])

    def acquire(self, keys: list[CacheKey]) -> tuple[list[int], list[bool]]:
        """Slots for a batch's states: (slot per row, hit per row). Slots are the caller's until `release`.

        A hit removes the entry from the index, so a step owns its slot exclusively: a second row with the same
        key in one batch (two racing steps of one session) misses and recomputes into a slot of its own.
        """
        with self._lock:
            slots, hits = [], []
            for key in keys:
                slot = self._index.pop(key, None)
                hit = slot is not None
                if hit:
                    self._live.pop(key[:-1], None)
                    self.hits += 1
                else:
                    slot = self._take_free(len(keys))
                    self.misses += 1
                slots.append(slot)
                hits.append(hit)
            return slots, hits

    def _take_free(self, batch: int) -> int:
        if not self._free and self._index and self.capacity >= self.max_slots:
            key, slot = self._index.popitem(last=False)  # evict the least recently used idle slot
            self._live.pop(key[:-1], None)
            return slot
        if not self._free:  # grow: up to the cap, or past it only as far as one batch needs
            self._allocate(max(self.capacity + 1, min(2 * self.capacity, max(self.max_slots, batch))))
        return self._free.pop()

    def release(self, slots: list[int], keys: list[CacheKey | None]) -> None:
        """Gives slots back: under `key` (the state the slot now holds), or free when the key is None."""
        with self._lock:
            for slot, key in zip(slots, keys, strict=True):
                if key is None:
                    self._free.append(slot)
                    continue
                superseded = [self._index.pop(key, None)]  # the same content in another slot (a racing duplicate)
                live = self._live.get(key[:-1])
                if live is not None and live != key:  # the session's older state: no step can use it any more
                    superseded.append(self._index.pop(live, None))
                self._free += [s for s in superseded if s is not None and s != slot]
                self._index[key] = slot
                self._live[key[:-1]] = key

    def drop_session(self, session_id: str) -> None:
        with self._lock:
            for key, slot in [(k, s) for k, s in self._index.items() if k[0] == session_id]:
                del self._index[key]
                self._live.pop(key[:-1], None)
                self._free.append(slot)

    def batch(self, slots: list[int], lengths: list[int], fixed_shapes: bool = False) -> KVCache:
        """The batch view of `slots` with each row's committed `lengths` (fixed_shapes: the view keeps no host copy
        of the lengths, so attention runs over all T slots, masked; see KVCache).

        A contiguous ascending run is a view of the pool (writes land in the slots); anything else is a gather of
        the frames in use, with commits written through to the slots.
        """
        host = None if fixed_shapes else list(lengths)
        device_lengths = torch.tensor(lengths, dtype=torch.long, device=self.device)
        first = slots[0]
        if slots == list(range(first, first + len(slots))):
            return KVCache(self.k[:, first : first + len(slots)], self.v[:, first : first + len(slots)], device_lengths, host)
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.gathers += 1
        return KVCache(self.k.index_select(1, index), self.v.index_select(1, index), device_lengths, host,
                       sink=(self.k, self.v, index))

    def __len__(self) -> int:
        return len(self._index)

    @property
    def nbytes(self) -> int:
        return (self.k.numel() + self.v.numel()) * self.k.element_size()
