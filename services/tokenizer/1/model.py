"""Triton model `tokenizer`: prompt frames -> tokens (encode), a session's newest frame -> pixels (decode).

Which of the two a request wants follows from its inputs: FRAMES + NUM_FRAMES encode, WINDOW_TOKENS +
NUM_FRAMES + SESSION_ID decode (FrameDecoder). The dynamic batcher only batches requests with the same
inputs and shapes, so one execute() call holds encodes or decodes, each run as one batch.
"""

from __future__ import annotations

import numpy as np
import torch

from genie.models.common import check_video
from genie.sampling import FrameDecoder
from genie.state import WorldState
from genie.train.checkpoint import load_model
from services.triton import protocol as P
from services.triton.stub import (
    check_cache_budget,
    check_tokens,
    execute_batched,
    instance_device,
    model_setup,
    num_frames,
    read_inputs,
    respond,
    scalar,
)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        world_dir, params = model_setup(args)
        cache_bytes = int(params.get(P.PARAM_CACHE_BYTES) or 1 << 30)
        self.decoder = FrameDecoder(load_model(world_dir / "tokenizer", "tokenizer"), cache_bytes, instance_device(args),
                                    params.get(P.PARAM_PRECISION) or "auto")
        if cache_bytes > 0:
            check_cache_budget(self.decoder.pool, args, "decoder")

    def execute(self, requests: list) -> list:
        return execute_batched(requests, self._parse, self._run, self._pack)

    def _parse(self, request) -> tuple[tuple, torch.Tensor | WorldState]:
        """-> (("encode", t), frames (t, H, W, C)) or (("decode",), state): encodes batch only at equal t."""
        x = read_inputs(request, (P.NUM_FRAMES,), (P.FRAMES, P.WINDOW_TOKENS, P.SESSION_ID))
        cfg = self.decoder.tokenizer.cfg
        if P.FRAMES in x and P.WINDOW_TOKENS not in x:
            t = num_frames(x, x[P.FRAMES].shape[0])
            frames = torch.from_numpy(np.array(x[P.FRAMES][:t]))  # (t, H, W, C) uint8
            check_video(frames[None], cfg.frame, cfg.max_frames)
            return ("encode", t), frames
        if P.WINDOW_TOKENS in x and P.SESSION_ID in x and P.FRAMES not in x:
            tokens = x[P.WINDOW_TOKENS]  # (W, N)
            t = num_frames(x, tokens.shape[0])
            if t > cfg.max_frames:
                raise ValueError(f"{t} frames do not fit the tokenizer window {cfg.max_frames}")
            check_tokens(tokens[:t], cfg.tokens_per_frame, cfg.vq.num_codes)
            window = torch.from_numpy(np.array(tokens[:t], dtype=np.int32))
            return ("decode",), WorldState(scalar(x, P.SESSION_ID), window, torch.full((t,), -1, dtype=torch.int32), 0, 0, 0)
        raise ValueError(f"send {' + '.join(P.ENCODE_INPUTS)} to encode or {' + '.join(P.DECODE_INPUTS)} to decode")

    def _run(self, key: tuple, items: list) -> list[tuple[str, np.ndarray]]:
        if key[0] == "encode":
            return [(P.TOKENS, row) for row in self.decoder.encode(torch.stack(items)).numpy()]  # (B, t, N)
        return [(P.FRAME, frame) for frame in self.decoder.decode_last(items).numpy()]  # (B, H, W, C)

    @staticmethod
    def _pack(result: tuple[str, np.ndarray]):
        name, value = result
        return respond(**{name: value})
