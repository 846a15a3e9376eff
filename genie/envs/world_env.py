"""Worlds as Gymnasium environments: `WorldEnv` (one session) and `WorldVectorEnv` (N sessions, one batched step).

Observations are the world's frames, (H, W, 3) uint8. Actions are the world's latent actions, `Discrete(A)`, or, given
an `ActionMapping` (latent -> real, from `genie agent train`), the game's real actions, `Discrete(R)`: each real action
plays the latent action the mapping's labelled transitions most often pair with it. A world has no reward and no end:
rewards are 0 and an episode is truncated after `max_steps` steps. `reset(seed=..., options={"prompt": ...})` starts
from a prompt: an index into the prompts, an (H, W, 3) uint8 frame or an image path; without one the prompt is drawn
with the env's seeded RNG, as is the world's sampling seed, so a seed fixes the whole episode.

The env talks to a `WorldEngine`: `InProcessEngine` runs a `genie.sampling.World` in this process (one batched
`World.step` per vector step); `services.gym_remote.GatewayEngine` runs sessions through the gateway's gRPC API.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv

from genie.agent.policy import ActionMapping


class WorldEngine(Protocol):
    """What the envs need from a world: batched sessions stepped with latent actions."""

    num_actions: int  # A
    frame_shape: tuple[int, int, int]  # (H, W, C)

    def reset(self, prompts: np.ndarray, seeds: Sequence[int]) -> tuple[list[Any], np.ndarray]:
        """prompts (B, H, W, C) uint8, B seeds -> B session handles, first frames (B, H, W, C) uint8."""
        ...

    def step(self, handles: Sequence[Any], actions: Sequence[int]) -> tuple[list[Any], np.ndarray]:
        """B handles, B latent actions -> new handles, frames (B, H, W, C) uint8."""
        ...

    def close(self, handles: Sequence[Any]) -> None: ...


class InProcessEngine:
    """A `genie.sampling.World` in this process: its WorldStates are the handles."""

    def __init__(self, world) -> None:
        self.world = world
        self.num_actions = int(world.num_actions)
        f = world.tokenizer.cfg.frame
        self.frame_shape = (f.height, f.width, f.channels)

    def reset(self, prompts: np.ndarray, seeds: Sequence[int]) -> tuple[list[Any], np.ndarray]:
        states, frames = self.world.reset(torch.from_numpy(np.ascontiguousarray(prompts))[:, None], list(seeds))
        return list(states), frames.numpy()

    def step(self, handles: Sequence[Any], actions: Sequence[int]) -> tuple[list[Any], np.ndarray]:
        states, frames = self.world.step(list(handles), [int(a) for a in actions])
        return list(states), frames.numpy()

    def close(self, handles: Sequence[Any]) -> None:
        pass


def load_engine(world_dir: Path) -> tuple[InProcessEngine, np.ndarray]:
    """The in-process engine of a world directory and its shipped prompts (P, H, W, C) uint8."""
    from genie.media import load_image
    from genie.worlds import load_prompts, load_world

    world, _ = load_world(Path(world_dir))  # with the history caches (a K/V pool), as the gateway keeps them
    engine = InProcessEngine(world)
    h, w, _ = engine.frame_shape
    paths = load_prompts(Path(world_dir))
    if not paths:
        raise ValueError(f"{world_dir} ships no prompts (prompts/*.png); pass prompts=")
    return engine, np.stack([load_image(p, h, w) for p in paths])


def default_world() -> Path:
    """The shipped demo world (GENIE_WORLD overrides it, as for the `genie` command)."""
    return Path(os.environ.get("GENIE_WORLD") or Path(__file__).resolve().parents[2] / "worlds" / "demo")


def real_to_latent(mapping: ActionMapping) -> np.ndarray:
    """(R,) latent action for each real action: the latent its labelled transitions most often came with (a real
    action never labelled plays the latent of the real action most labelled overall)."""
    counts = np.asarray(mapping.counts)  # (A, R)
    fallback = int(counts[:, int(counts.sum(0).argmax())].argmax())
    return np.array([int(counts[:, r].argmax()) if counts[:, r].sum() else fallback for r in range(counts.shape[1])])


class _Sessions:
    """State shared by both envs: the engine, prompts, action translation and spaces."""

    def __init__(self, engine: WorldEngine | None, world: str | Path | None, prompts: np.ndarray | None,
                 mapping: ActionMapping | None, max_steps: int) -> None:
        if engine is None:
            engine, shipped = load_engine(Path(world or default_world()))
            prompts = shipped if prompts is None else prompts
        if prompts is None or prompts.ndim != 4 or tuple(prompts.shape[1:]) != tuple(engine.frame_shape):
            raise ValueError(f"need prompts (P, {', '.join(map(str, engine.frame_shape))}) uint8, got "
                             f"{None if prompts is None else prompts.shape}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if mapping is not None and len(mapping.table) != engine.num_actions:
            raise ValueError(f"the mapping has {len(mapping.table)} latent actions, the world {engine.num_actions}")
        self.engine, self.prompts, self.max_steps = engine, np.asarray(prompts, dtype=np.uint8), max_steps
        self.to_latent = real_to_latent(mapping) if mapping is not None else None
        self.observation_space = spaces.Box(0, 255, shape=tuple(engine.frame_shape), dtype=np.uint8)
        self.action_space = spaces.Discrete(len(self.to_latent) if self.to_latent is not None else engine.num_actions)

    def prompt(self, rng: np.random.Generator, options: dict[str, Any] | None) -> np.ndarray:
        choice = (options or {}).get("prompt")
        if choice is None:
            return self.prompts[int(rng.integers(len(self.prompts)))]
        if isinstance(choice, (int, np.integer)):
            if not 0 <= int(choice) < len(self.prompts):
                raise ValueError(f"prompt index {choice} is out of range [0, {len(self.prompts)})")
            return self.prompts[int(choice)]
        if isinstance(choice, (str, Path)):
            from genie.media import load_image

            return load_image(Path(choice), *self.engine.frame_shape[:2])
        frame = np.asarray(choice)
        if frame.shape != tuple(self.engine.frame_shape) or frame.dtype != np.uint8:
            raise ValueError(f"a prompt frame must be {self.engine.frame_shape} uint8, got {frame.shape} {frame.dtype}")
        return frame

    def latent(self, actions: Sequence[int]) -> list[int]:
        out = []
        for a in actions:
            if not self.action_space.contains(np.int64(a)):
                raise ValueError(f"action {a} is not in {self.action_space}")
            out.append(int(self.to_latent[int(a)]) if self.to_latent is not None else int(a))
        return out


class WorldEnv(gym.Env):
    """One world session as a `gymnasium.Env` (see the module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}

    def __init__(self, world: str | Path | None = None, *, engine: WorldEngine | None = None,
                 prompts: np.ndarray | None = None, mapping: ActionMapping | None = None, max_steps: int = 256,
                 render_mode: str | None = None) -> None:
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self._s = _Sessions(engine, world, prompts, mapping, max_steps)
        self.observation_space, self.action_space = self._s.observation_space, self._s.action_space
        self.render_mode = render_mode
        self._handle: Any = None
        self._frame: np.ndarray | None = None
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        prompt = self._s.prompt(self.np_random, options)
        world_seed = int(self.np_random.integers(2**31 - 1))
        if self._handle is not None:
            self._s.engine.close([self._handle])
        handles, frames = self._s.engine.reset(prompt[None], [world_seed])
        self._handle, self._frame, self._t = handles[0], frames[0], 0
        return self._frame, {"world_seed": world_seed}

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._handle is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        latent = self._s.latent([action])
        handles, frames = self._s.engine.step([self._handle], latent)
        self._handle, self._frame = handles[0], frames[0]
        self._t += 1
        return self._frame, 0.0, False, self._t >= self._s.max_steps, {"latent_action": latent[0]}

    def render(self) -> np.ndarray | None:
        return self._frame if self.render_mode == "rgb_array" else None

    def close(self) -> None:
        if self._handle is not None:
            self._s.engine.close([self._handle])
            self._handle = None


class WorldVectorEnv(VectorEnv):
    """`num_envs` world sessions stepped together: one batched engine call per `step` (autoreset: next step)."""

    metadata = {"render_modes": ["rgb_array"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int, world: str | Path | None = None, *, engine: WorldEngine | None = None,
                 prompts: np.ndarray | None = None, mapping: ActionMapping | None = None, max_steps: int = 256,
                 render_mode: str | None = None) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self._s = _Sessions(engine, world, prompts, mapping, max_steps)
        self.num_envs, self.render_mode = num_envs, render_mode
        self.single_observation_space, self.single_action_space = self._s.observation_space, self._s.action_space
        self.observation_space = spaces.Box(0, 255, shape=(num_envs, *self._s.observation_space.shape), dtype=np.uint8)
        self.action_space = spaces.MultiDiscrete(np.full(num_envs, self._s.action_space.n))
        self._rngs = [np.random.default_rng() for _ in range(num_envs)]
        self._handles: list[Any] | None = None
        self._frames = np.zeros(self.observation_space.shape, dtype=np.uint8)
        self._t = np.zeros(num_envs, dtype=np.int64)
        self._needs_reset = np.zeros(num_envs, dtype=bool)

    def reset(self, *, seed: int | Sequence[int] | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """seed: one int (sub-env i gets seed + i, as gymnasium's vector envs do) or one per sub-env; options as
        WorldEnv's, with an optional "prompts" list (one per sub-env) instead of "prompt"."""
        seeds = [None] * self.num_envs if seed is None else (
            [seed + i for i in range(self.num_envs)] if isinstance(seed, (int, np.integer)) else list(seed))
        if len(seeds) != self.num_envs:
            raise ValueError(f"need {self.num_envs} seeds, got {len(seeds)}")
        each = (options or {}).get("prompts")
        if each is not None and len(each) != self.num_envs:
            raise ValueError(f"need {self.num_envs} prompts, got {len(each)}")
        opts = [{**(options or {}), "prompt": each[i]} if each is not None else options for i in range(self.num_envs)]
        self._rngs = [np.random.default_rng(s) for s in seeds]
        if self._handles is not None:
            self._s.engine.close(self._handles)
        self._handles, world_seeds = self._start(list(range(self.num_envs)), opts)
        self._t[:] = 0
        self._needs_reset[:] = False
        return self._frames.copy(), {"world_seed": np.array(world_seeds)}

    def _start(self, rows: list[int], opts: list[dict[str, Any] | None]) -> tuple[list[Any], list[int]]:
        prompts = np.stack([self._s.prompt(self._rngs[i], opts[k]) for k, i in enumerate(rows)])
        world_seeds = [int(self._rngs[i].integers(2**31 - 1)) for i in rows]
        handles, frames = self._s.engine.reset(prompts, world_seeds)
        self._frames[rows] = frames
        return handles, world_seeds

    def step(self, actions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        if self._handles is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        actions = np.asarray(actions).reshape(-1)
        if len(actions) != self.num_envs:
            raise ValueError(f"need {self.num_envs} actions, got {len(actions)}")
        restart = np.flatnonzero(self._needs_reset).tolist()
        running = np.flatnonzero(~self._needs_reset).tolist()
        if restart:  # sub-envs truncated by the last step start a new episode; their actions are ignored
            self._s.engine.close([self._handles[i] for i in restart])
            handles, _ = self._start(restart, [None] * len(restart))
            for i, h in zip(restart, handles, strict=True):
                self._handles[i] = h
            self._t[restart] = 0
        if running:
            latent = self._s.latent(actions[running])
            handles, frames = self._s.engine.step([self._handles[i] for i in running], latent)
            for i, h in zip(running, handles, strict=True):
                self._handles[i] = h
            self._frames[running] = frames
            self._t[running] += 1
        truncated = self._t >= self._s.max_steps
        self._needs_reset = truncated.copy()
        zeros = np.zeros(self.num_envs, dtype=bool)
        return self._frames.copy(), np.zeros(self.num_envs), zeros, truncated, {}

    def render(self) -> tuple[np.ndarray, ...] | None:
        return tuple(self._frames) if self.render_mode == "rgb_array" else None

    def close_extras(self, **kwargs: Any) -> None:
        if self._handles is not None:
            self._s.engine.close(self._handles)
            self._handles = None
