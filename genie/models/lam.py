"""Latent action model: a VQ-VAE that infers a small discrete action between consecutive frames."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from genie.models.common import FrameSpec, Positions, check_video, patchify, to_model_range, unpatchify
from genie.nn.st_transformer import STTransformer, STTransformerConfig
from genie.nn.vq import VectorQuantizer, VectorQuantizerConfig


@dataclass(frozen=True)
class LatentActionModelConfig:
    frame: FrameSpec = field(default_factory=FrameSpec)
    patch: int = 16
    encoder: STTransformerConfig = field(default_factory=lambda: STTransformerConfig(dim=256, depth=4, heads=8))
    decoder: STTransformerConfig = field(default_factory=lambda: STTransformerConfig(dim=256, depth=4, heads=8))
    vq: VectorQuantizerConfig = field(default_factory=lambda: VectorQuantizerConfig(num_codes=8, code_dim=32))
    # Past frames the LAM sees for each transition: 0 = every earlier frame of the clip (causal); 1 = only the frame
    # before (LAPO's forward model): its decoder cannot predict motion from momentum, so the latent must name it.
    context: int = 0
    # With context=1, the share of training pairs shown backwards (x_{t+1} -> x_t). One frame still tells a decoder
    # which way the agent walks (its pose and facing), so the latent could name only surprises (starting, stopping,
    # jumping); in a reversed pair the same pose moves the other way, so the latent must name the motion itself.
    time_reversal: float = 0.0
    # > 0: each transition's reconstruction MSE is divided by (its copy MSE + balance * the batch's mean copy MSE), so
    # a 1-2 pixel scroll counts as much as a jump that changes the whole frame and the few codes are spent on every
    # kind of motion, not only the biggest; 0 = plain MSE.
    balance: float = 0.0
    # > 0: within each transition, a pixel's squared error is weighted by 1 + change_focus * (how much that pixel
    # changed / the transition's mean change), a weighted mean, so a transition's loss is spread over the pixels that
    # moved: a walk whose scroll rounds to 0 px still changes the agent's sprite, and predicting the sprite right then
    # counts more than predicting the still backdrop. A reallocation inside each transition only: `balance` still sets
    # how much each transition counts. 0 = every pixel alike.
    change_focus: float = 0.0
    # Fields that shape only the training objective, not the weights: a warm start (`genie train --init`) may change them.
    objective_fields: ClassVar[tuple[str, ...]] = ("time_reversal", "balance", "change_focus")

    def __post_init__(self) -> None:
        self.frame.check_patch(self.patch, "LAM")
        if self.context not in (0, 1):
            raise ValueError(f"LAM context must be 0 (all past frames) or 1 (the previous frame), got {self.context}")
        if self.balance < 0 or self.change_focus < 0:
            raise ValueError(f"balance and change_focus must be >= 0, got {self.balance}, {self.change_focus}")
        if not 0.0 <= self.time_reversal < 1.0 or (self.time_reversal and self.context != 1):
            raise ValueError(f"time_reversal must be in [0, 1) and needs context=1, got {self.time_reversal}")
        if not self.encoder.causal_time or not self.decoder.causal_time:
            raise ValueError("the LAM's encoder and decoder must use causal temporal attention")
        if self.encoder.max_frames != self.decoder.max_frames:
            raise ValueError(f"encoder/decoder max_frames differ: {self.encoder.max_frames} vs {self.decoder.max_frames}")

    @property
    def num_actions(self) -> int:
        return self.vq.num_codes

    @property
    def max_frames(self) -> int:
        return self.encoder.max_frames


@dataclass
class LatentActionOutput:
    actions: Tensor  # (B, T-1) int64 in [0, A): action t is the transition from frame t to t+1
    prediction: Tensor  # (B, T-1, H, W, C) float in [-1, 1], predicted frames 1..T-1
    loss: Tensor
    logs: dict[str, float]


class LatentActionModel(nn.Module):
    """Encoder sees x_1..x_{t+1} and emits a latent action; decoder predicts x_{t+1} from x_1..x_t and it.

    The encoder appends one learned "action query" token to every frame; by causal temporal attention its
    output at frame t+1 has seen exactly frames <= t+1, which is what the action between t and t+1 needs.
    """

    def __init__(self, cfg: LatentActionModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n, patch_dim = cfg.frame.tokens_per_frame(cfg.patch), cfg.patch**2 * cfg.frame.channels
        self.enc_in = nn.Linear(patch_dim, cfg.encoder.dim)
        self.action_query = nn.Parameter(torch.randn(cfg.encoder.dim) * 0.02)
        self.enc_pos = Positions(n + 1, cfg.max_frames, cfg.encoder.dim)
        self.encoder = STTransformer(cfg.encoder)
        self.enc_out = nn.Linear(cfg.encoder.dim, cfg.vq.code_dim)
        self.vq = VectorQuantizer(cfg.vq)
        self.dec_in = nn.Linear(patch_dim, cfg.decoder.dim)
        self.dec_action = nn.Linear(cfg.vq.code_dim, cfg.decoder.dim)
        self.dec_pos = Positions(n, cfg.max_frames, cfg.decoder.dim)
        self.decoder = STTransformer(cfg.decoder)
        self.dec_out = nn.Linear(cfg.decoder.dim, patch_dim)

    def _encode(self, pixels: Tensor):
        """context=0: clips (B, T, H, W, C); context=1: frame pairs (B, T-1, 2, H, W, C), each encoded on its own.
        -> quantized actions with indices (B, T-1)."""
        b = pixels.shape[0]
        if self.cfg.context == 1:
            q = self._encode_clips(rearrange(pixels, "b t two h w c -> (b t) two h w c"))  # (B*(T-1), 1)
            q.indices = rearrange(q.indices, "(b t) one -> b (t one)", b=b)  # (B, T-1)
            q.quantized = rearrange(q.quantized, "(b t) one d -> b (t one) d", b=b)  # (B, T-1, code_dim)
            return q
        return self._encode_clips(pixels)

    def _encode_clips(self, pixels: Tensor):
        b, t = pixels.shape[:2]
        x = self.enc_in(patchify(pixels, self.cfg.patch))  # (B, T, N, D)
        query = self.action_query.expand(b, t, 1, -1)  # (B, T, 1, D)
        h = self.encoder(self.enc_pos(torch.cat([x, query], dim=2)))  # (B, T, N+1, D)
        z = self.enc_out(h[:, 1:, -1])  # (B, T-1, code_dim): action into frame t+1
        return self.vq(z)

    def _decode(self, past: Tensor, actions: Tensor) -> Tensor:
        """past: (B, T-1, H, W, C) the frame before each prediction; actions (B, T-1, code_dim) -> predicted patches
        of the frames after them (B, T-1, N, p*p*C)."""
        x = self.dec_in(patchify(past, self.cfg.patch)) + self.dec_action(actions)[:, :, None]  # (B, T-1, N, D)
        if self.cfg.context == 1:  # every prediction from the one frame before it
            b = x.shape[0]
            h = self.decoder(self.dec_pos(rearrange(x, "b t n d -> (b t) 1 n d")))  # (B*(T-1), 1, N, D)
            return self.dec_out(rearrange(h, "(b t) 1 n d -> b t n d", b=b))
        return self.dec_out(self.decoder(self.dec_pos(x)))

    def _pairs(self, pixels: Tensor, reverse: Tensor | None = None) -> Tensor:
        """(B, T, H, W, C) -> (B, T-1, 2, H, W, C): each transition's (before, after); rows of `reverse` (B, T-1)
        bool swapped to (after, before)."""
        pairs = torch.stack([pixels[:, :-1], pixels[:, 1:]], dim=2)
        if reverse is not None:
            pairs = torch.where(reverse[:, :, None, None, None, None], pairs.flip(2), pairs)
        return pairs

    @torch.no_grad()
    def infer_actions(self, video: Tensor) -> Tensor:
        """video: (B, T, H, W, C) uint8 or float [0, 1], T >= 2 -> actions (B, T-1) int64 in [0, A)."""
        check_video(video, self.cfg.frame, self.cfg.max_frames, min_frames=2)
        pixels = to_model_range(video)
        return self._encode(self._pairs(pixels) if self.cfg.context == 1 else pixels).indices

    def forward(self, video: Tensor) -> LatentActionOutput:
        check_video(video, self.cfg.frame, self.cfg.max_frames, min_frames=2)
        pixels = to_model_range(video)  # (B, T, H, W, C)
        if self.cfg.context == 1:
            reverse = None
            if self.training and self.cfg.time_reversal > 0:  # drawn from the global generator (checkpointed)
                reverse = (torch.rand(pixels.shape[0], pixels.shape[1] - 1) < self.cfg.time_reversal).to(pixels.device)
            pairs = self._pairs(pixels, reverse)  # (B, T-1, 2, H, W, C)
            q, past, after = self._encode(pairs), pairs[:, :, 0], pairs[:, :, 1]
        else:
            q, past, after = self._encode(pixels), pixels[:, :-1], pixels[:, 1:]
        pred = self._decode(past, q.quantized)  # (B, T-1, N, p*p*C)
        target = patchify(after, self.cfg.patch)  # (B, T-1, N, p*p*C)
        before = patchify(past, self.cfg.patch)
        pred32 = pred.float()
        plain = transition_errors(pred32, target, before)  # (B, T-1): each transition's MSE
        err = transition_errors(pred32, target, before, self.cfg.change_focus) if self.cfg.change_focus > 0 else plain
        mse = plain.mean()
        if self.cfg.balance > 0:
            copy = (before - target).pow(2).mean((-2, -1))  # (B, T-1)
            loss = (err / (copy + self.cfg.balance * copy.mean()).clamp_min(1e-6)).mean() + q.loss
        else:
            loss = err.mean() + q.loss
        # How much the action helps over copying the last frame: the LAM is useless if this stays ~0.
        copy_mse = F.mse_loss(before, target)
        logs = {
            "mse": mse.item(),
            "copy_mse": copy_mse.item(),
            "vq_loss": q.loss.item(),
            "codebook_usage": q.usage.item(),
        }
        prediction = unpatchify(pred, self.cfg.patch, self.cfg.frame)
        return LatentActionOutput(actions=q.indices, prediction=prediction, loss=loss, logs=logs)


def transition_errors(pred: Tensor, target: Tensor, before: Tensor, change_focus: float = 0.0) -> Tensor:
    """Each transition's squared error: (B, T-1, N, P) predicted, true and previous patches -> (B, T-1).

    change_focus = 0: the plain mean. > 0: a weighted mean, a pixel's weight 1 + change_focus * (its change / the
    transition's mean change), so the pixels that changed carry change_focus / (1 + change_focus) of the weight however
    few they are (a 2-pixel sprite step as much as a scroll of the whole frame)."""
    sq = (pred - target).pow(2)
    if change_focus == 0:
        return sq.mean((-2, -1))
    change = (target - before).abs()
    weight = 1 + change_focus * change / change.mean((-2, -1), keepdim=True).clamp_min(1e-6)
    return (weight * sq).mean((-2, -1)) / weight.mean((-2, -1))
