"""Triton model `dynamics`: the next frame's tokens for a batch of sessions (DynamicsEngine.next_tokens).

Each instance runs on its instance group's device (a GPU for KIND_GPU) and keeps a soft, bounded pool of session
histories' K/V caches there, so a session's repeated steps on one instance skip recomputing its window; a miss
(another instance, a restart) recomputes it, with identical tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from genie.sampling import DynamicsEngine, SamplingConfig
from genie.state import WorldState
from genie.train.checkpoint import load_model
from genie.worlds import load_world_config_of
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
        keep_frames = load_world_config_of(world_dir).sampling.keep_frames
        self.engine = DynamicsEngine(load_model(world_dir / "dynamics", "dynamics"), keep_frames,
                                     int(params.get(P.PARAM_CACHE_BYTES) or 1 << 30), instance_device(args),
                                     params.get(P.PARAM_PRECISION) or "auto")
        self.keep_frames = keep_frames
        if self.engine.caching:
            check_cache_budget(self.engine.pool, args, "dynamics")

    def execute(self, requests: list) -> list:
        return execute_batched(requests, self._parse, self._run, lambda tokens: respond(**{P.NEXT_TOKENS: tokens}))

    def _parse(self, request) -> tuple[SamplingConfig, tuple[WorldState, int]]:
        """-> (sampling settings: requests that share them step together, (state, action))."""
        x = read_inputs(request, P.DYNAMICS_INPUTS, P.DYNAMICS_OPTIONAL_INPUTS)
        cfg = self.engine.dynamics.cfg
        tokens, actions = x[P.WINDOW_TOKENS], x[P.WINDOW_ACTIONS]  # (W, N), (W,)
        if tokens.shape[0] > self.engine.window or actions.shape != tokens.shape[:1]:
            raise ValueError(f"window must be at most {self.engine.window} frames with one action each, "
                             f"got tokens {tokens.shape} and actions {actions.shape}")
        t = num_frames(x, tokens.shape[0])
        check_tokens(tokens[:t], cfg.tokens_per_frame, cfg.num_tokens)
        if int(actions[:t].min()) < -1 or int(actions[:t].max()) >= cfg.num_actions:
            raise ValueError(f"{P.WINDOW_ACTIONS} out of range [-1, {cfg.num_actions})")
        action = int(scalar(x, P.ACTION))
        self.engine.check_actions([action])
        state = WorldState(
            scalar(x, P.SESSION_ID),
            torch.from_numpy(np.array(tokens[:t], dtype=np.int32)),
            torch.from_numpy(np.array(actions[:t], dtype=np.int32)),
            int(scalar(x, P.SEED)),
            int(scalar(x, P.VERSION)),
            int(scalar(x, P.STEP)),
        )
        sampling = SamplingConfig(
            steps=int(scalar(x, P.SAMPLING_STEPS)),
            temperature=float(scalar(x, P.TEMPERATURE)),
            schedule=scalar(x, P.SCHEDULE),
            choice_temperature=float(scalar(x, P.CHOICE_TEMPERATURE)),
            keep_frames=self.keep_frames,
            guidance=float(scalar(x, P.GUIDANCE)) if P.GUIDANCE in x else 1.0,
        )
        return sampling, (state, action)

    def _run(self, sampling: SamplingConfig, items: list[tuple[WorldState, int]]) -> list[np.ndarray]:
        tokens = self.engine.next_tokens([s for s, _ in items], [a for _, a in items], sampling)  # (B, N)
        return list(tokens.numpy())
