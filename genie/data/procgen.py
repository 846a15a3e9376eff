"""Procgen (CoinRun by default) episodes with recorded true actions, generated in parallel, deterministically.

Episodes are produced in chunks of `episodes_per_env`: chunk c creates one environment seeded from
(seed, split, c) and plays its episodes with a sticky random policy seeded the same way, so the dataset depends
only on (env, split, seed, episodes), never on the number of workers. Splits take disjoint level ranges, so
validation and test levels are never seen in training. True actions are kept for evaluation only.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from genie.data.shards import ShardWriter

SPLIT_LEVELS = {"train": 0, "val": 1_000_000, "test": 2_000_000}  # first level of each split's range
LEVELS_PER_SPLIT = 1_000_000
# Procgen's 15 actions, in the order of its key combos (`ProcgenGym3Env.get_combos()`); () is NOOP.
ACTION_NAMES = ("LEFT+DOWN", "LEFT", "LEFT+UP", "DOWN", "NOOP", "UP", "RIGHT+DOWN", "RIGHT", "RIGHT+UP",
                "D", "A", "W", "S", "Q", "E")
POLICIES = ("sticky", "walk")
# The "walk" policy's actions and weights: the arrow keys a player uses, so the agent walks both ways, stands and
# jumps in long runs (the uniform sticky policy spends 7 of 15 actions on keys CoinRun ignores, and its 1-4 frame
# holds rarely let the agent get moving, so its data barely shows walking).
WALK_ACTIONS = (7, 1, 4, 5, 8, 2)  # RIGHT, LEFT, NOOP, UP, RIGHT+UP, LEFT+UP
WALK_WEIGHTS = (0.28, 0.24, 0.18, 0.10, 0.10, 0.10)


def combo_names(combos) -> tuple[str, ...]:
    """Procgen key combos, e.g. [("LEFT", "DOWN"), ()] -> ("LEFT+DOWN", "NOOP")."""
    return tuple("+".join(c) if c else "NOOP" for c in combos)


@dataclass(frozen=True)
class ProcgenConfig:
    env: str = "coinrun"
    split: str = "train"
    episodes: int = 100
    seed: int = 0
    num_levels: int = 10_000  # distinct levels the split draws from (from its base level)
    distribution_mode: str = "easy"
    max_frames: int = 500  # episodes are cut here (a CoinRun episode can last 1000 frames)
    min_frames: int = 16  # shorter episodes are dropped: a training clip needs T frames
    policy: str = "sticky"  # "sticky": any of the 15 actions; "walk": arrow keys only (WALK_ACTIONS)
    hold_min: int = 1  # the random policy holds each action for U{hold_min..hold_max} frames
    hold_max: int = 4
    episodes_per_env: int = 16

    def __post_init__(self) -> None:
        if self.split not in SPLIT_LEVELS:
            raise ValueError(f"unknown split {self.split!r}; expected one of {sorted(SPLIT_LEVELS)}")
        if self.episodes < 1 or not 1 <= self.num_levels <= LEVELS_PER_SPLIT:
            raise ValueError(f"need episodes >= 1 and 1 <= num_levels <= {LEVELS_PER_SPLIT}")
        if not 2 <= self.min_frames <= self.max_frames:
            raise ValueError(f"need 2 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        if not 1 <= self.hold_min <= self.hold_max:
            raise ValueError(f"need 1 <= hold_min <= hold_max, got {self.hold_min}, {self.hold_max}")
        if self.distribution_mode not in ("easy", "hard"):
            raise ValueError(f"distribution_mode must be easy or hard, got {self.distribution_mode!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; expected one of {POLICIES}")

    def draw_action(self, rng: np.random.Generator, num_actions: int) -> int:
        """The policy's next action (held for U{hold_min..hold_max} frames)."""
        if self.policy == "walk":
            return WALK_ACTIONS[int(rng.choice(len(WALK_ACTIONS), p=WALK_WEIGHTS))]
        return int(rng.integers(num_actions))


def procgen_env_class():
    """procgen's ProcgenGym3Env (an optional dependency, imported where used), without the four-line "Gym has been
    unmaintained" notice that importing gym 0.26 prints to stderr on every start."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        from procgen import ProcgenGym3Env
    return ProcgenGym3Env


def make_env(cfg: ProcgenConfig, chunk: int):
    """Chunk `chunk`'s environment (seeded from (seed, split, chunk)) and its policy's random generator."""
    ProcgenGym3Env = procgen_env_class()  # noqa: N806 - a class

    seq = np.random.SeedSequence([cfg.seed, SPLIT_LEVELS[cfg.split], chunk])
    env_seed, policy_seed = seq.generate_state(2)
    env = ProcgenGym3Env(
        num=1, env_name=cfg.env, start_level=SPLIT_LEVELS[cfg.split], num_levels=cfg.num_levels,
        distribution_mode=cfg.distribution_mode, rand_seed=int(env_seed) & 0x7FFFFFFF,
    )
    return env, np.random.default_rng(policy_seed)


def _chunk(cfg: ProcgenConfig, chunk: int, states: bool = False) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """Plays the episodes of one chunk; returns [(frames (F,64,64,3) uint8, actions (F-1,) int16, meta)]. With
    states, meta["states"] holds the game's state before each recorded action (`env.get_state()`)."""
    n = min(cfg.episodes_per_env, cfg.episodes - chunk * cfg.episodes_per_env)
    env, rng = make_env(cfg, chunk)
    num_actions = int(env.ac_space.eltype.n)
    if combo_names(env.get_combos()) != ACTION_NAMES:
        raise ValueError(f"procgen's actions {combo_names(env.get_combos())} are not the expected {ACTION_NAMES}")
    out: list[tuple[np.ndarray, np.ndarray, dict]] = []
    attempts = 0
    while len(out) < n and attempts < 20 * n:
        attempts += 1
        level = int(env.get_info()[0]["level_seed"])
        frames, actions, snapshots = [env.observe()[1]["rgb"][0].copy()], [], []
        action, hold = 0, 0
        while len(frames) < cfg.max_frames:
            if hold == 0:
                action, hold = cfg.draw_action(rng, num_actions), int(rng.integers(cfg.hold_min, cfg.hold_max + 1))
            if states:
                snapshots.append(env.get_state())
            env.act(np.array([action]))
            hold -= 1
            _, obs, first = env.observe()
            if first[0]:  # the episode ended; this observation already belongs to the next one
                break
            actions.append(action)
            frames.append(obs["rgb"][0].copy())
        else:
            _finish_episode(env, rng, num_actions)
        if len(frames) >= cfg.min_frames:
            meta = {"chunk": chunk, "level": level, **({"states": snapshots[: len(actions)]} if states else {})}
            out.append((np.stack(frames), np.array(actions, dtype=np.int16), meta))
    return out


def _finish_episode(env, rng: np.random.Generator, num_actions: int) -> None:
    """Plays on (unrecorded) until the environment starts a new episode, so the next one begins clean."""
    for _ in range(2000):
        env.act(np.array([int(rng.integers(num_actions))]))
        if env.observe()[2][0]:
            return


def generate(cfg: ProcgenConfig, out: Path, workers: int = 1, progress: bool = True) -> dict:
    """Writes cfg.episodes episodes to the dataset directory `out` and returns a summary."""
    chunks = -(-cfg.episodes // cfg.episodes_per_env)
    writer = ShardWriter(out)
    bar = tqdm(total=cfg.episodes, desc=f"{cfg.env}/{cfg.split}", disable=not progress, unit="ep")
    for episodes in _run_chunks(cfg, chunks, workers):
        for frames, actions, meta in episodes:
            writer.add(frames, actions, meta)
        bar.update(len(episodes))
    bar.close()
    info = {"source": "procgen", "config": asdict(cfg), "num_true_actions": len(ACTION_NAMES),
            "action_names": list(ACTION_NAMES)}
    writer.close(info)
    return {"episodes": len(writer.episodes), "frames": writer.total_frames, "out": str(out)}


def _run_chunks(cfg: ProcgenConfig, chunks: int, workers: int) -> Iterator[list]:
    """Yields each chunk's episodes in chunk order (so output is independent of `workers`)."""
    if workers <= 1:
        for c in range(chunks):
            yield _chunk(cfg, c)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_chunk, [cfg] * chunks, range(chunks))
