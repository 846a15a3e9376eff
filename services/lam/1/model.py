"""Triton model `lam`: the latent actions between a clip's consecutive frames (LatentActionModel.infer_actions)."""

from __future__ import annotations

import numpy as np
import torch

from genie.models.common import check_video
from genie.train.checkpoint import load_model
from services.triton import protocol as P
from services.triton.stub import execute_batched, instance_device, model_setup, num_frames, read_inputs, respond


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        world_dir, _ = model_setup(args)
        self.device = torch.device(instance_device(args))
        self.lam = load_model(world_dir / "lam", "lam").to(self.device)  # fp32: the nearest-code search must not round

    def execute(self, requests: list) -> list:
        return execute_batched(requests, self._parse, self._run, lambda actions: respond(**{P.LATENT_ACTIONS: actions}))

    def _parse(self, request) -> tuple[int, torch.Tensor]:
        """-> (t: clips batch only at equal length, frames (t, H, W, C) uint8)."""
        x = read_inputs(request, P.LAM_INPUTS)
        t = num_frames(x, x[P.FRAMES].shape[0], least=2)
        frames = torch.from_numpy(np.array(x[P.FRAMES][:t]))  # (t, H, W, C)
        check_video(frames[None], self.lam.cfg.frame, self.lam.cfg.max_frames, min_frames=2)
        return t, frames

    @torch.no_grad()
    def _run(self, t: int, clips: list[torch.Tensor]) -> list[np.ndarray]:
        return list(self.lam.infer_actions(torch.stack(clips).to(self.device)).to('cpu', torch.int32).numpy())  # (B, t - 1)
