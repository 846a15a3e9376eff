"""Spatio-temporal transformer: spatial attention within a frame, causal temporal attention per position.

Shape glossary used across `genie`:
    B batch, T frames, H W pixels, C channels, h w token grid, N = h*w tokens per frame,
    D model dim, K codebook size, A action codes, S MaskGIT steps, L layers (depth).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass(frozen=True)
class STTransformerConfig:
    dim: int = 256
    depth: int = 8
    heads: int = 8
    ffn_mult: int = 4
    max_frames: int = 16  # T: the temporal window the model is trained on
    causal_time: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.depth <= 0 or self.heads <= 0:
            raise ValueError(f"dim, depth, heads must be positive, got {self.dim}, {self.depth}, {self.heads}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class KVCache:
    """Temporal-attention keys/values of the frames already committed, for every layer.

    Only causal temporal attention looks across frames, so a new frame needs, per layer and per spatial
    position, the keys/values of past frames at that position. Slot `lengths[b]` is scratch space where the
    frame being generated writes its own key/value; `commit` makes it permanent.
    """

    k: Tensor  # (L, B, N, heads, T, dh) float
    v: Tensor  # (L, B, N, heads, T, dh) float
    lengths: Tensor  # (B,) int64, committed frames per row, <= T - 1 while a frame is in flight

    @classmethod
    def empty(cls, cfg: STTransformerConfig, batch: int, tokens: int, dtype=torch.float32) -> KVCache:
        dh = cfg.dim // cfg.heads
        shape = (cfg.depth, batch, tokens, cfg.heads, cfg.max_frames, dh)
        return cls(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), torch.zeros(batch, dtype=torch.long))

    @property
    def capacity(self) -> int:
        return self.k.shape[4]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @staticmethod
    def stack(caches: list[KVCache]) -> KVCache:
        """Joins per-session caches (each B=1) into one batch cache (copies)."""
        if len(caches) == 1:
            return caches[0]
        return KVCache(
            torch.cat([c.k for c in caches], dim=1),
            torch.cat([c.v for c in caches], dim=1),
            torch.cat([c.lengths for c in caches]),
        )

    def unstack(self) -> list[KVCache]:
        """Splits a batch cache into per-session caches (copies, so each owns only its own memory)."""
        if self.k.shape[1] == 1:
            return [self]
        return [
            KVCache(self.k[:, b : b + 1].clone(), self.v[:, b : b + 1].clone(), self.lengths[b : b + 1].clone())
            for b in range(self.k.shape[1])
        ]


class Attention(nn.Module):
    """Multi-head self-attention over the second-to-last axis with a fused QKV projection."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = rearrange(self.qkv(x), "b s (three h e) -> three b h s e", three=3, h=self.heads)
        return q, k, v  # each (B', heads, S, dh)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        q, k, v = self.qkv_heads(x)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)  # (B', heads, S, dh)
        return self.proj(rearrange(out, "b h s e -> b s (h e)"))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class STBlock(nn.Module):
    """Pre-norm block: spatial attention, then temporal attention, then one feed-forward."""

    def __init__(self, cfg: STTransformerConfig) -> None:
        super().__init__()
        self.causal = cfg.causal_time
        self.norm_s = nn.LayerNorm(cfg.dim)
        self.spatial = Attention(cfg.dim, cfg.heads, cfg.dropout)
        self.norm_t = nn.LayerNorm(cfg.dim)
        self.temporal = Attention(cfg.dim, cfg.heads, cfg.dropout)
        self.norm_f = nn.LayerNorm(cfg.dim)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_mult, cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, N, D) -> (B, T, N, D)."""
        b, t = x.shape[:2]
        h = rearrange(x, "b t n d -> (b t) n d")
        h = h + self.spatial(self.norm_s(h))
        h = rearrange(h, "(b t) n d -> (b n) t d", b=b)
        h = h + self.temporal(self.norm_t(h), causal=self.causal)
        h = rearrange(h, "(b n) t d -> b t n d", b=b)
        return h + self.ffn(self.norm_f(h))

    def forward_frame(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, mask: Tensor | None) -> Tensor:
        """One new frame per row against cached past frames.

        x: (B, N, D); k_cache, v_cache: (B, N, heads, T, dh), written in place at slot lengths[b];
        mask: (B, 1, 1, t_max + 1) bool (True = attend) or None when every row has the same length.
        """
        b, n, _ = x.shape
        x = x + self.spatial(self.norm_s(x))
        q, k, v = self.temporal.qkv_heads(rearrange(self.norm_t(x), "b n d -> (b n) 1 d"))  # (B*N, heads, 1, dh)
        rows = torch.arange(b)
        # The cache keeps its own dtype (fp32 by default) even when the block runs under bf16 autocast.
        k_cache[rows, :, :, lengths] = rearrange(k, "(b n) h 1 e -> b n h e", b=b).to(k_cache.dtype)
        v_cache[rows, :, :, lengths] = rearrange(v, "(b n) h 1 e -> b n h e", b=b).to(v_cache.dtype)
        t_used = int(lengths.max()) + 1
        keys = rearrange(k_cache[:, :, :, :t_used], "b n h t e -> (b n) h t e").to(q.dtype)  # (B*N, heads, t, dh)
        values = rearrange(v_cache[:, :, :, :t_used], "b n h t e -> (b n) h t e").to(q.dtype)
        attn_mask = None if mask is None else mask.repeat_interleave(n, dim=0)  # (B*N, 1, 1, t)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask)  # (B*N, heads, 1, dh)
        x = x + self.temporal.proj(rearrange(out, "(b n) h 1 e -> b n (h e)", b=b))
        return x + self.ffn(self.norm_f(x))


class STTransformer(nn.Module):
    """A stack of ST blocks with a final LayerNorm. Positions are added by the caller."""

    def __init__(self, cfg: STTransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(STBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, N, D) float -> (B, T, N, D). Output at frame t depends only on frames <= t when causal."""
        if x.shape[1] > self.cfg.max_frames:
            raise ValueError(f"got {x.shape[1]} frames, the model's window is max_frames={self.cfg.max_frames}")
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_frame(self, x: Tensor, cache: KVCache, commit: bool) -> Tensor:
        """Runs one new frame per row using `cache` for the past; identical maths to `forward`.

        x: (B, N, D) -> (B, N, D). With commit=True the frame's keys/values stay in the cache and
        `cache.lengths` grows by one; otherwise the scratch slot is overwritten by the next call.
        """
        if not self.cfg.causal_time:
            raise ValueError("frame-by-frame inference needs causal temporal attention")
        if int(cache.lengths.max()) >= cache.capacity:
            raise ValueError(f"cache is full ({cache.capacity} frames): slide the window before stepping")
        lengths = cache.lengths
        mask = None
        if int(lengths.min()) != int(lengths.max()):
            t_used = int(lengths.max()) + 1
            mask = (torch.arange(t_used)[None, :] <= lengths[:, None])[:, None, None, :]  # (B, 1, 1, t)
        for i, block in enumerate(self.blocks):
            x = block.forward_frame(x, cache.k[i], cache.v[i], lengths, mask)
        if commit:
            cache.lengths = lengths + 1
        return self.norm(x)
