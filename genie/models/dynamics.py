"""Dynamics model: a MaskGIT transformer predicting the next frame's tokens from past tokens and actions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genie.models.common import Positions
from genie.nn.maskgit import random_frame_mask
from genie.nn.st_transformer import KVCache, STTransformer, STTransformerConfig


@dataclass(frozen=True)
class DynamicsModelConfig:
    num_tokens: int = 1024  # K: the tokenizer's codebook size
    tokens_per_frame: int = 256  # N: the tokenizer's token grid
    num_actions: int = 8  # A: the LAM's codebook size
    transformer: STTransformerConfig = field(default_factory=lambda: STTransformerConfig(dim=512, depth=8, heads=8))
    mask_min: float = 0.5  # train-time mask rate per frame ~ U[mask_min, mask_max]
    mask_max: float = 1.0
    action_dropout: float = 0.1  # train-time chance an action is replaced by "no action" (prompts have none)

    def __post_init__(self) -> None:
        if self.num_tokens < 2 or self.tokens_per_frame < 1 or self.num_actions < 1:
            raise ValueError(f"bad sizes K={self.num_tokens} N={self.tokens_per_frame} A={self.num_actions}")
        if not 0.0 < self.mask_min <= self.mask_max <= 1.0:
            raise ValueError(f"need 0 < mask_min <= mask_max <= 1, got {self.mask_min}, {self.mask_max}")
        if not 0.0 <= self.action_dropout < 1.0:
            raise ValueError(f"action_dropout must be in [0, 1), got {self.action_dropout}")
        if not self.transformer.causal_time:
            raise ValueError("the dynamics model needs causal temporal attention")

    @property
    def mask_id(self) -> int:
        return self.num_tokens

    @property
    def null_action(self) -> int:
        return self.num_actions

    @property
    def max_frames(self) -> int:
        return self.transformer.max_frames


@dataclass
class DynamicsOutput:
    logits: Tensor  # (B, T, N, K)
    loss: Tensor
    logs: dict[str, float]


class DynamicsModel(nn.Module):
    """Frame t's input is its tokens (or the mask token) plus the embedding of the action that led into it.

    Actions are indices (stop-gradient w.r.t. the LAM); index A means "no action" (first frame, prompts).
    """

    def __init__(self, cfg: DynamicsModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.transformer.dim
        self.token_emb = nn.Embedding(cfg.num_tokens + 1, d)  # + mask token
        self.action_emb = nn.Embedding(cfg.num_actions + 1, d)  # + null action
        self.pos = Positions(cfg.tokens_per_frame, cfg.max_frames, d)
        self.transformer = STTransformer(cfg.transformer)
        self.head = nn.Linear(d, cfg.num_tokens)

    def _check(self, tokens: Tensor, actions: Tensor) -> None:
        if tokens.ndim != 3 or tokens.shape[2] != self.cfg.tokens_per_frame:
            raise ValueError(f"expected tokens (B, T, {self.cfg.tokens_per_frame}), got {tuple(tokens.shape)}")
        if actions.shape != tokens.shape[:2]:
            raise ValueError(f"expected actions {tuple(tokens.shape[:2])}, got {tuple(actions.shape)}")

    def logits(self, tokens: Tensor, actions_in: Tensor) -> Tensor:
        """tokens: (B, T, N) int64 in [0, K] (K = mask); actions_in: (B, T) int64 in [0, A] -> (B, T, N, K)."""
        self._check(tokens, actions_in)
        x = self.token_emb(tokens) + self.action_emb(actions_in)[:, :, None]  # (B, T, N, D)
        return self.head(self.transformer(self.pos(x)))

    def new_cache(self, batch: int, dtype: torch.dtype = torch.float32, device=None) -> KVCache:
        return KVCache.empty(self.cfg.transformer, batch, self.cfg.tokens_per_frame, dtype, device)

    @torch.no_grad()
    def frame_logits(self, tokens: Tensor, action_in: Tensor, cache: KVCache, commit: bool = False) -> Tensor | None:
        """The next frame of each row against its cached past.

        tokens: (B, N) int64 in [0, K]; action_in: (B,) int64 in [0, A] -> logits (B, N, K), or None when
        commit=True (then the frame's keys/values are stored and the output head is skipped).
        """
        x = self.token_emb(tokens) + self.action_emb(action_in)[:, None]  # (B, N, D)
        h = self.transformer.forward_frame(self.pos.frame(x, cache.lengths), cache, commit=commit, output=not commit)
        return None if commit else self.head(h)

    def forward(self, tokens: Tensor, actions: Tensor, generator: torch.Generator | None = None) -> DynamicsOutput:
        """Training loss. tokens: (B, T, N) int64 in [0, K); actions: (B, T-1) int64 in [0, A), action t is
        the transition from frame t to t+1."""
        b, t, n = tokens.shape
        if actions.shape != (b, t - 1):
            raise ValueError(f"expected actions {(b, t - 1)}, got {tuple(actions.shape)}")
        null = torch.full((b, 1), self.cfg.null_action, dtype=torch.long, device=tokens.device)
        actions_in = torch.cat([null, actions.long()], dim=1)  # (B, T): action leading into frame t
        # Draws come from `generator`'s device (the CPU in training: the same masks on any device), then move.
        if self.training and self.cfg.action_dropout > 0:
            drop = torch.rand(b, t, generator=generator) < self.cfg.action_dropout
            actions_in = actions_in.masked_fill(drop.to(tokens.device), self.cfg.null_action)
        mask = random_frame_mask((b, t, n), self.cfg.mask_min, self.cfg.mask_max, generator).to(tokens.device)  # (B, T, N)
        inputs = tokens.masked_fill(mask, self.cfg.mask_id)
        logits = self.logits(inputs, actions_in)  # (B, T, N, K)
        loss = F.cross_entropy(logits[mask].float(), tokens[mask])
        acc = (logits[mask].argmax(-1) == tokens[mask]).float().mean()
        return DynamicsOutput(logits=logits, loss=loss, logs={"ce": loss.item(), "masked_acc": acc.item()})
