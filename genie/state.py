"""The serialisable state of one play session, and the content digest that keys its soft K/V caches."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

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
