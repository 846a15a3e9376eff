"""Latent action model: a VQ-VAE that infers a small discrete action between consecutive frames."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
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

    def __post_init__(self) -> None:
        self.frame.check_patch(self.patch, "LAM")
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
        b, t = pixels.shape[:2]
        x = self.enc_in(patchify(pixels, self.cfg.patch))  # (B, T, N, D)
        query = self.action_query.expand(b, t, 1, -1)  # (B, T, 1, D)
        h = self.encoder(self.enc_pos(torch.cat([x, query], dim=2)))  # (B, T, N+1, D)
        z = self.enc_out(h[:, 1:, -1])  # (B, T-1, code_dim): action into frame t+1
        return self.vq(z)

    @torch.no_grad()
    def infer_actions(self, video: Tensor) -> Tensor:
        """video: (B, T, H, W, C) uint8 or float [0, 1], T >= 2 -> actions (B, T-1) int64 in [0, A)."""
        check_video(video, self.cfg.frame, self.cfg.max_frames, min_frames=2)
        return self._encode(to_model_range(video)).indices

    def forward(self, video: Tensor) -> LatentActionOutput:
        check_video(video, self.cfg.frame, self.cfg.max_frames, min_frames=2)
        pixels = to_model_range(video)  # (B, T, H, W, C)
        q = self._encode(pixels)
        past = self.dec_in(patchify(pixels[:, :-1], self.cfg.patch))  # (B, T-1, N, D)
        h = self.dec_pos(past + self.dec_action(q.quantized)[:, :, None])  # action t added to all of frame t
        pred = self.dec_out(self.decoder(h))  # (B, T-1, N, p*p*C)
        target = patchify(pixels[:, 1:], self.cfg.patch)
        mse = F.mse_loss(pred.float(), target)
        loss = mse + q.loss
        # How much the action helps over copying the last frame: the LAM is useless if this stays ~0.
        copy_mse = F.mse_loss(patchify(pixels[:, :-1], self.cfg.patch), target)
        logs = {
            "mse": mse.item(),
            "copy_mse": copy_mse.item(),
            "vq_loss": q.loss.item(),
            "codebook_usage": q.usage.item(),
        }
        prediction = unpatchify(pred, self.cfg.patch, self.cfg.frame)
        return LatentActionOutput(actions=q.indices, prediction=prediction, loss=loss, logs=logs)
