"""Video tokenizer: an ST-ViViT VQ-VAE mapping frames to discrete tokens and back."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genie.models.common import FrameSpec, Positions, check_video, patchify, to_model_range, unpatchify
from genie.nn.st_transformer import KVCache, STTransformer, STTransformerConfig
from genie.nn.vq import VectorQuantizer, VectorQuantizerConfig


@dataclass(frozen=True)
class VideoTokenizerConfig:
    frame: FrameSpec = field(default_factory=FrameSpec)
    patch: int = 4
    encoder: STTransformerConfig = field(default_factory=lambda: STTransformerConfig(dim=256, depth=4, heads=8))
    decoder: STTransformerConfig = field(default_factory=lambda: STTransformerConfig(dim=256, depth=4, heads=8))
    vq: VectorQuantizerConfig = field(default_factory=lambda: VectorQuantizerConfig(num_codes=1024, code_dim=32))

    def __post_init__(self) -> None:
        self.frame.check_patch(self.patch, "tokenizer")
        if not self.encoder.causal_time or not self.decoder.causal_time:
            raise ValueError("the tokenizer's encoder and decoder must use causal temporal attention")
        if self.encoder.max_frames != self.decoder.max_frames:
            raise ValueError(f"encoder/decoder max_frames differ: {self.encoder.max_frames} vs {self.decoder.max_frames}")

    @property
    def tokens_per_frame(self) -> int:
        return self.frame.tokens_per_frame(self.patch)

    @property
    def max_frames(self) -> int:
        return self.encoder.max_frames


@dataclass
class TokenizerOutput:
    recon: Tensor  # (B, T, H, W, C) float in [-1, 1]
    indices: Tensor  # (B, T, N) int64 in [0, K)
    loss: Tensor  # () reconstruction MSE + VQ loss
    logs: dict[str, float]


class VideoTokenizer(nn.Module):
    def __init__(self, cfg: VideoTokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n, patch_dim = cfg.tokens_per_frame, cfg.patch**2 * cfg.frame.channels
        self.enc_in = nn.Linear(patch_dim, cfg.encoder.dim)
        self.enc_pos = Positions(n, cfg.max_frames, cfg.encoder.dim)
        self.encoder = STTransformer(cfg.encoder)
        self.enc_out = nn.Linear(cfg.encoder.dim, cfg.vq.code_dim)
        self.vq = VectorQuantizer(cfg.vq)
        self.dec_in = nn.Linear(cfg.vq.code_dim, cfg.decoder.dim)
        self.dec_pos = Positions(n, cfg.max_frames, cfg.decoder.dim)
        self.decoder = STTransformer(cfg.decoder)
        self.dec_out = nn.Linear(cfg.decoder.dim, patch_dim)

    def _quantize(self, video: Tensor):
        check_video(video, self.cfg.frame, self.cfg.max_frames)
        x = self.enc_in(patchify(to_model_range(video), self.cfg.patch))  # (B, T, N, D)
        z = self.enc_out(self.encoder(self.enc_pos(x)))  # (B, T, N, code_dim)
        return self.vq(z)

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """video: (B, T, H, W, C) uint8 or float [0, 1] -> tokens (B, T, N) int64 in [0, K)."""
        return self._quantize(video).indices

    def _decode_latents(self, q: Tensor) -> Tensor:
        x = self.dec_out(self.decoder(self.dec_pos(self.dec_in(q))))  # (B, T, N, p*p*C)
        return unpatchify(x, self.cfg.patch, self.cfg.frame)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """tokens: (B, T, N) int64 -> video (B, T, H, W, C) float in [-1, 1]."""
        return self._decode_latents(self.vq.lookup(tokens))

    def new_cache(self, batch: int, dtype: torch.dtype = torch.float32, device=None) -> KVCache:
        return KVCache.empty(self.cfg.decoder, batch, self.cfg.tokens_per_frame, dtype, device)

    @torch.no_grad()
    def decode_frame(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Decodes the next frame of each row given the decoder cache of its past; commits it to the cache.

        tokens: (B, N) int64 -> frame (B, H, W, C) float in [-1, 1].
        """
        x = self.dec_pos.frame(self.dec_in(self.vq.lookup(tokens)), cache.lengths)  # (B, N, D)
        x = self.dec_out(self.decoder.forward_frame(x, cache, commit=True))  # (B, N, p*p*C)
        return unpatchify(x[:, None], self.cfg.patch, self.cfg.frame)[:, 0]

    def forward(self, video: Tensor) -> TokenizerOutput:
        """video: (B, T, H, W, C) uint8 or float [0, 1] -> reconstruction, tokens and training loss."""
        target = to_model_range(video)
        q = self._quantize(video)
        recon = self._decode_latents(q.quantized)
        mse = F.mse_loss(recon.float(), target)
        loss = mse + q.loss
        psnr = 10 * torch.log10(4.0 / mse.detach().clamp_min(1e-10))  # peak-to-peak range is 2
        logs = {"mse": mse.item(), "vq_loss": q.loss.item(), "psnr": psnr.item(), "codebook_usage": q.usage.item()}
        return TokenizerOutput(recon=recon, indices=q.indices, loss=loss, logs=logs)
