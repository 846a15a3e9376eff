"""Shared fixtures: the tiny world config and, once per session, a tiny world trained on sprites."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genie.presets import tiny
from genie.train.loop import train
from genie.worlds import export_world


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_world_cfg():
    return tiny()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_world_cfg) -> Path:
    """Trains tokenizer, LAM and dynamics of the tiny preset (200 steps each, ~15 s on 2 cores)."""
    root = tmp_path_factory.mktemp("tiny-run")
    for kind in ("tokenizer", "lam"):
        train(kind, tiny_world_cfg, root / kind, progress=False, tensorboard=False)
    from genie.train.checkpoint import latest_checkpoint

    frozen = {"tokenizer": latest_checkpoint(root / "tokenizer"), "lam": latest_checkpoint(root / "lam")}
    train("dynamics", tiny_world_cfg, root / "dynamics", frozen=frozen, progress=False, tensorboard=False)
    return root


@pytest.fixture(scope="session")
def trained_world_dir(trained_run, tmp_path_factory) -> Path:
    return export_world(trained_run, tmp_path_factory.mktemp("worlds") / "tiny")
