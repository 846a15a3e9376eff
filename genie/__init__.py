"""Genie: generative interactive environments — the model library (pure PyTorch, no service imports)."""

from genie.config import TrainConfig, WorldConfig
from genie.models.dynamics import DynamicsModel, DynamicsModelConfig
from genie.models.lam import LatentActionModel, LatentActionModelConfig
from genie.models.tokenizer import VideoTokenizer, VideoTokenizerConfig
from genie.sampling import SamplingConfig, World
from genie.state import WorldState

__all__ = [
    "DynamicsModel",
    "DynamicsModelConfig",
    "LatentActionModel",
    "LatentActionModelConfig",
    "SamplingConfig",
    "TrainConfig",
    "VideoTokenizer",
    "VideoTokenizerConfig",
    "World",
    "WorldConfig",
    "WorldState",
]
