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

    `host_lengths` mirrors `lengths` on the host, so a step never reads the device to size its attention; with
    None the cache runs at fixed shapes (attention over all T slots, masked), which a CUDA graph can capture.
    `sink` is where committed keys/values must also go when `k`/`v` are a gathered copy of pool slots.
    """

    k: Tensor  # (L, B, N, heads, T, dh) float
    v: Tensor  # (L, B, N, heads, T, dh) float
    lengths: Tensor  # (B,) int64 on k's device, committed frames per row, <= T - 1 while a frame is in flight
    host_lengths: list[int] | None = None
    sink: tuple[Tensor, Tensor, Tensor] | None = None  # pool k, pool v (L, P, N, heads, T, dh), slots (B,) int64

    @classmethod
    def empty(cls, cfg: STTransformerConfig, batch: int, tokens: int, dtype=torch.float32, device=None) -> KVCache:
        dh = cfg.dim // cfg.heads
        shape = (cfg.depth, batch, tokens, cfg.heads, cfg.max_frames, dh)
        zeros = lambda: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        return cls(zeros(), zeros(), torch.zeros(batch, dtype=torch.long, device=device), [0] * batch)

    @property
    def capacity(self) -> int:
        return self.k.shape[4]

    def frame_layout(self) -> FrameLayout:
        """How a pass over one new frame reads and writes this cache (computed once per pass, not per layer)."""
        b = self.k.shape[1]
        if self.host_lengths is None:  # fixed shapes: every slot, masked
            valid = torch.arange(self.capacity, device=self.lengths.device)[None, :] <= self.lengths[:, None]  # (B, T)
            return FrameLayout(self.capacity, valid[:, None, None, :], None)
        if max(self.host_lengths) >= self.capacity:
            raise ValueError(f"cache is full ({self.capacity} frames): slide the window before stepping")
        t_used = max(self.host_lengths) + 1
        if min(self.host_lengths) == t_used - 1:
            return FrameLayout(t_used, None, t_used - 1)
        valid = torch.tensor([[t <= n for t in range(t_used)] for n in self.host_lengths], device=self.k.device)  # (B, t)
        return FrameLayout(t_used, valid.view(b, 1, 1, t_used), None)

    def advance(self) -> None:
        """Commits the frame in flight: every row's length grows by one."""
        self.lengths = self.lengths + 1
        if self.host_lengths is not None:
            self.host_lengths = [n + 1 for n in self.host_lengths]


@dataclass(frozen=True)
class FrameLayout:
    t_used: int  # cache slots a new frame attends over (its own included)
    mask: Tensor | None  # (B, 1, 1, t_used) bool, True = attend; None when every row has the same length
    slot: int | None  # the row-wide slot of the new frame when every row has the same length, else None


def attend(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """F.scaled_dot_product_attention, in fp32 on a CPU even under bf16 autocast: torch's CPU flash-attention kernel
    is slower in bf16 than in fp32 (measured on an AVX-512 BF16 EPYC, demo world B=16: 2.5 vs 1.9 ms a call), while
    the projections around it run ~2.4x faster in bf16. k and v may be in another dtype (a K/V cache's); the
    output comes back in q's dtype."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), **kwargs)
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)


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
        out = attend(q, k, v, dropout_p=p, is_causal=causal)  # (B', heads, S, dh)
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

    def forward_frame(self, x: Tensor, cache: KVCache, layer: int, layout: FrameLayout, commit: bool,
                      kv_only: bool = False) -> Tensor | None:
        """One new frame per row against cached past frames.

        x: (B, N, D) -> (B, N, D). This layer's slice of `cache` is written in place at each row's slot
        (`cache.lengths`); with commit=True also into `cache.sink`. kv_only: stop once the keys/values are
        written (the last layer of a commit pass whose output nobody reads) and return None.
        """
        b, n, d = x.shape
        heads = self.temporal.heads
        x = x + self.spatial(self.norm_s(x))
        qkv = self.temporal.qkv(self.norm_t(x)).view(b, n, 3, heads, d // heads)  # (B, N, 3, heads, dh)
        q, k, v = qkv.unbind(dim=2)  # each (B, N, heads, dh)
        k_cache, v_cache = cache.k[layer], cache.v[layer]  # (B, N, heads, T, dh)
        # The cache keeps its own dtype (fp32 by default) even when the block runs under bf16 autocast.
        if layout.slot is not None:  # every row writes the same slot: a strided copy, no index tensors
            k_cache[:, :, :, layout.slot] = k
            v_cache[:, :, :, layout.slot] = v
        else:
            rows = torch.arange(b, device=x.device)
            k_cache[rows, :, :, cache.lengths] = k.to(k_cache.dtype)
            v_cache[rows, :, :, cache.lengths] = v.to(v_cache.dtype)
        if commit and cache.sink is not None:
            pool_k, pool_v, slots = cache.sink
            pool_k[layer][slots, :, :, cache.lengths] = k.to(pool_k.dtype)
            pool_v[layer][slots, :, :, cache.lengths] = v.to(pool_v.dtype)
        if kv_only:
            return None
        t = layout.t_used
        keys = k_cache[:, :, :, :t].reshape(b * n, heads, t, -1)  # (B*N, heads, t, dh), a view
        values = v_cache[:, :, :, :t].reshape(b * n, heads, t, -1)
        attn_mask = None if layout.mask is None else layout.mask.repeat_interleave(n, dim=0)  # (B*N, 1, 1, t)
        out = attend(q.reshape(b * n, heads, 1, -1), keys, values, attn_mask=attn_mask)
        x = x + self.temporal.proj(out.view(b, n, d))  # (B*N, heads, 1, dh) -> (B, N, D)
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

    def forward_frame(self, x: Tensor, cache: KVCache, commit: bool, output: bool = True) -> Tensor | None:
        """Runs one new frame per row using `cache` for the past; identical maths to `forward`.

        x: (B, N, D) -> (B, N, D). With commit=True the frame's keys/values stay in the cache and
        `cache.lengths` grows by one; otherwise the scratch slot is overwritten by the next call.
        output=False (with commit) only stores the keys/values and returns None: the last layer's attention
        and feed-forward are skipped.
        """
        if not self.cfg.causal_time:
            raise ValueError("frame-by-frame inference needs causal temporal attention")
        if not (output or commit):
            raise ValueError("a pass that neither commits nor returns its output does nothing")
        layout = cache.frame_layout()
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block.forward_frame(x, cache, i, layout, commit, kv_only=not output and i == last)
        if commit:
            cache.advance()
        return None if x is None else self.norm(x)
