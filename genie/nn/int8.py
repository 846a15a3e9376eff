"""Int8 linear layers for CPU inference: weights per output channel, activations per row, int32 accumulation.

torch's dynamic quantisation scales a whole activation tensor at once, so one session's output would depend on the
other sessions in its batch. Here every row (token) gets its own scale and the product accumulates exactly in int32,
so a row's output depends on that row alone: batching, padding and cache slots change nothing (the engine's
contract). On the CPUs here such a layer of the demo world's shapes runs 2x (B=1) to 4x (B=16) faster than fp32
(benchmarks/bench_int8.py).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor, nn

QMAX = 127  # symmetric int8: -127..127, so negation is exact and no code is wasted on -128


@functools.cache
def keep_freed_memory() -> bool:
    """Lets glibc reuse freed blocks of up to 32 MB instead of returning them to the OS (process-wide; up to 256 MB
    of freed memory is kept). An int8 layer at B=16 makes two fresh (M, N) buffers per call; handed back and mapped
    anew each time, their page faults cost more than the int8 product saves (1024x192x768: 3.6 ms a call, 0.34 ms
    with this). Returns whether it took effect (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 256 << 20))


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(M, K) float -> (int8 (M, K), fp32 scales (M, 1)), each row scaled by its own absolute maximum."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(QMAX)  # (M, 1)
    return torch.div(x, scale).round_().clamp_(-QMAX, QMAX).to(torch.int8), scale


class Int8Linear(nn.Module):
    """An inference-only copy of an nn.Linear computed as int8 x int8 -> int32 (`torch._int_mm`), then rescaled to
    fp32. The weight is quantised once per output channel; the input per row at every call."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()  # (N, K)
        w_q, w_scale = quantize_rows(w)  # a weight row is an output channel
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", w_q.t().contiguous())  # (K, N) int8, the layout _int_mm takes
        self.register_buffer("w_scale", w_scale.view(1, -1))  # (1, N)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x_q, x_scale = quantize_rows(x.reshape(-1, self.in_features).float())  # (M, K) int8, (M, 1)
        acc = torch._int_mm(x_q, self.weight_t)  # (M, N) int32, exact
        # In place after the one conversion: fresh (M, N) buffers cost page faults at every call at B=16.
        y = torch.mul(acc, x_scale).mul_(self.w_scale)  # (M, N) fp32
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears(root: nn.Module, parts: list[nn.Module] | None = None) -> int:
    """Replaces (in place) every nn.Linear of `root` that lies inside one of `parts` (default: all of root, a part
    may itself be a Linear) with an Int8Linear; returns how many were replaced."""
    inside = {id(m) for part in (parts or [root]) for m in part.modules()}
    count = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and id(child) in inside:
                setattr(parent, name, Int8Linear(child))
                count += 1
    return count
