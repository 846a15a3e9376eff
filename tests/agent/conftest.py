"""Fixtures for the agent tests: a few real CoinRun expert episodes and a tiny untrained 64x64 LAM as a 'world'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genie.agent.expert import ExpertConfig, record
from genie.models.common import FrameSpec
from genie.models.lam import LatentActionModel, LatentActionModelConfig
from genie.nn.st_transformer import STTransformerConfig
from genie.nn.vq import VectorQuantizerConfig
from genie.train.checkpoint import save_checkpoint

SMALL_EXPERT = ExpertConfig(episodes=4, max_frames=30, candidates=4, horizon=12, commit=4)


def tiny_lam(num_codes: int = 4) -> LatentActionModel:
    st = STTransformerConfig(dim=32, depth=1, heads=2, ffn_mult=2, max_frames=5)
    cfg = LatentActionModelConfig(frame=FrameSpec(64, 64, 3), patch=16, encoder=st, decoder=st,
                                  vq=VectorQuantizerConfig(num_codes=num_codes, code_dim=8))
    torch.manual_seed(0)
    return LatentActionModel(cfg).eval()


@pytest.fixture(scope="session")
def expert_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("expert") / "data"
    record(SMALL_EXPERT, out, progress=False)
    return out


@pytest.fixture(scope="session")
def lam_world(tmp_path_factory) -> Path:
    """A directory holding only lam/: all `agent train --target latent` reads from a world."""
    world = tmp_path_factory.mktemp("lam-world")
    save_checkpoint(world / "lam", "lam", tiny_lam(), 0)
    return world
