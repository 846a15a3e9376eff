"""Building blocks: the spatio-temporal transformer, vector quantiser and MaskGIT decoding."""

from genie.nn.maskgit import mask_ratio, maskgit_decode, random_frame_mask
from genie.nn.st_transformer import KVCache, STTransformer, STTransformerConfig
from genie.nn.vq import VectorQuantizer, VectorQuantizerConfig

__all__ = [
    "KVCache",
    "STTransformer",
    "STTransformerConfig",
    "VectorQuantizer",
    "VectorQuantizerConfig",
    "mask_ratio",
    "maskgit_decode",
    "random_frame_mask",
]
