"""The three Genie models and their configs."""

from genie.models.common import FrameSpec
from genie.models.dynamics import DynamicsModel, DynamicsModelConfig
from genie.models.lam import LatentActionModel, LatentActionModelConfig
from genie.models.tokenizer import VideoTokenizer, VideoTokenizerConfig

__all__ = [
    "DynamicsModel",
    "DynamicsModelConfig",
    "FrameSpec",
    "LatentActionModel",
    "LatentActionModelConfig",
    "VideoTokenizer",
    "VideoTokenizerConfig",
]
