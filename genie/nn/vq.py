"""Vector quantiser with a straight-through estimator, commitment loss and dead-code reset."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """A block that runs in its tensors' own precision even inside a bf16 autocast region on `device`."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # no autocast exists there, so none can be active


@dataclass(frozen=True)
class VectorQuantizerConfig:
    num_codes: int = 1024  # K
    code_dim: int = 32
    beta: float = 0.25  # commitment weight
    normalize: bool = True  # l2-normalised codes and inputs (cosine distance): keeps usage high
    reset_after: int = 50  # a code unused for this many training steps is re-seeded from the batch

    def __post_init__(self) -> None:
        if self.num_codes < 2:
            raise ValueError(f"num_codes must be >= 2, got {self.num_codes}")
        if self.code_dim < 1:
            raise ValueError(f"code_dim must be >= 1, got {self.code_dim}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.reset_after < 0:
            raise ValueError(f"reset_after must be >= 0 (0 disables resets), got {self.reset_after}")


@dataclass
class QuantizerOutput:
    quantized: Tensor  # (..., code_dim) straight-through: value of the code, gradient to the input
    indices: Tensor  # (...) int64 in [0, K)
    loss: Tensor  # () codebook + beta * commitment
    usage: Tensor  # () fraction of codes used in this batch


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VectorQuantizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.codebook = nn.Parameter(torch.randn(cfg.num_codes, cfg.code_dim) / cfg.code_dim**0.5)
        # Steps since each code was last chosen; a buffer so it is checkpointed with the weights.
        self.register_buffer("idle_steps", torch.zeros(cfg.num_codes, dtype=torch.long))

    def codes(self) -> Tensor:
        """(K, code_dim) the codebook as used for lookup."""
        return F.normalize(self.codebook, dim=-1) if self.cfg.normalize else self.codebook

    def lookup(self, indices: Tensor) -> Tensor:
        """indices: (...) int64 in [0, K) -> (..., code_dim)."""
        return F.embedding(indices, self.codes())

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z: (..., code_dim) float -> QuantizerOutput."""
        if z.shape[-1] != self.cfg.code_dim:
            raise ValueError(f"expected last dim {self.cfg.code_dim}, got shape {tuple(z.shape)}")
        flat = z.reshape(-1, z.shape[-1]).float()  # (M, code_dim)
        if self.cfg.normalize:
            flat = F.normalize(flat, dim=-1)
        codes = self.codes().float()
        # fp32 even under bf16 autocast: the nearest code must not flip with rounding (and train as it infers).
        with full_precision(flat.device):
            dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]  # (M, K)
        indices = dist.argmin(dim=1)  # (M,)
        q = codes[indices]  # (M, code_dim)
        loss = F.mse_loss(q, flat.detach()) + self.cfg.beta * F.mse_loss(flat, q.detach())
        q_st = flat + (q - flat).detach()
        counts = torch.bincount(indices, minlength=self.cfg.num_codes)
        if self.training and self.cfg.reset_after > 0:
            self._reset_dead_codes(counts, flat.detach())
        return QuantizerOutput(
            quantized=q_st.reshape(z.shape).to(z.dtype),
            indices=indices.reshape(z.shape[:-1]),
            loss=loss,
            usage=(counts > 0).float().mean(),
        )

    @torch.no_grad()
    def _reset_dead_codes(self, counts: Tensor, batch: Tensor) -> None:
        self.idle_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.idle_steps >= self.cfg.reset_after).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        # Re-seed dead codes with random encoder outputs from this batch, slightly jittered so that
        # several codes reset from the same vector do not stay identical. Drawn from the global CPU generator on
        # any device, so a GPU run resets the same codes as a CPU run, and checkpoints carry that generator.
        pick = torch.randint(0, batch.shape[0], (dead.numel(),)).to(batch.device)
        jitter = torch.randn(dead.numel(), batch.shape[1], dtype=batch.dtype).to(batch.device)
        fresh = batch[pick] + 0.01 * jitter * batch.std()
        self.codebook.data[dead] = fresh.to(self.codebook.dtype)
        self.idle_steps[dead] = 0
