"""The CoinRun expert: a short-horizon search planner over the simulator's own state save/restore.

At each decision point it snapshots the game (`env.get_state()`), plays a few fixed action sequences of `horizon`
frames (run right; jump then run; long jump; wait then run) and `candidates` random ones drawn from a rightward-biased
macro-action distribution, each restored from the snapshot, and scores them: reaching the coin beats everything, dying
loses, otherwise the agent's x position at the end counts (read from the serialised game state: the float that moves
+x under RIGHT and not under LEFT, found once per episode by probing). It commits the first `commit` frames of the best
sequence (ties go to the earlier candidate, so the fixed ones win), or the whole sequence up to the coin. It never sees
a frame. Episodes are played on one level each (level seeds drawn from (seed, split, episode)), so a recording replays
exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from genie.data.procgen import ACTION_NAMES, LEVELS_PER_SPLIT, SPLIT_LEVELS, combo_names, procgen_env_class
from genie.data.shards import ShardWriter

# Macro actions the planner samples from, with their weights: mostly run or jump right, sometimes wait or back off.
MACRO_ACTIONS = (7, 8, 5, 4, 1, 2)  # RIGHT, RIGHT+UP, UP, NOOP, LEFT, LEFT+UP
MACRO_WEIGHTS = (0.35, 0.35, 0.08, 0.08, 0.07, 0.07)


@dataclass(frozen=True)
class ExpertConfig:
    env: str = "coinrun"
    split: str = "train"
    episodes: int = 100
    seed: int = 0
    num_levels: int = 10_000  # distinct levels the split draws from
    distribution_mode: str = "easy"
    max_frames: int = 500  # an episode that has not reached the coin by then counts as a failure
    candidates: int = 8  # random sequences tried per decision, after the fixed ones
    horizon: int = 24  # frames each tried sequence looks ahead
    commit: int = 8  # frames of the chosen sequence played before planning again
    hold_min: int = 2
    hold_max: int = 6

    def __post_init__(self) -> None:
        if self.split not in SPLIT_LEVELS:
            raise ValueError(f"unknown split {self.split!r}; expected one of {sorted(SPLIT_LEVELS)}")
        if self.episodes < 1 or not 1 <= self.num_levels <= LEVELS_PER_SPLIT:
            raise ValueError(f"need episodes >= 1 and 1 <= num_levels <= {LEVELS_PER_SPLIT}")
        if self.max_frames < 2 or self.candidates < 1 or not 1 <= self.commit <= self.horizon:
            raise ValueError(f"need max_frames >= 2, candidates >= 1, 1 <= commit <= horizon; got {self}")
        if not 1 <= self.hold_min <= self.hold_max:
            raise ValueError(f"need 1 <= hold_min <= hold_max, got {self.hold_min}, {self.hold_max}")
        if self.distribution_mode not in ("easy", "hard"):
            raise ValueError(f"distribution_mode must be easy or hard, got {self.distribution_mode!r}")


def episode_level(split: str, seed: int, episode: int, num_levels: int) -> int:
    """The level seed episode `episode` of a split plays: a pure function of its arguments."""
    draw = np.random.SeedSequence([seed, SPLIT_LEVELS[split], episode]).generate_state(1)[0]
    return SPLIT_LEVELS[split] + int(draw) % num_levels


def make_env(env_name: str, level: int, distribution_mode: str, num: int = 1):
    """A Procgen env that plays only `level` (every reset returns to it)."""
    ProcgenGym3Env = procgen_env_class()  # noqa: N806 - a class

    env = ProcgenGym3Env(num=num, env_name=env_name, start_level=level, num_levels=1,
                         distribution_mode=distribution_mode, rand_seed=0)
    if combo_names(env.get_combos()) != ACTION_NAMES:
        raise ValueError(f"procgen's actions {combo_names(env.get_combos())} are not the expected {ACTION_NAMES}")
    return env


def _sequence(rng: np.random.Generator, cfg: ExpertConfig) -> list[int]:
    seq: list[int] = []
    while len(seq) < cfg.horizon:
        action = MACRO_ACTIONS[int(rng.choice(len(MACRO_ACTIONS), p=MACRO_WEIGHTS))]
        seq += [action] * int(rng.integers(cfg.hold_min, cfg.hold_max + 1))
    return seq[: cfg.horizon]


def _fixed(horizon: int) -> list[list[int]]:
    """The sequences tried first at every decision: run right, jump then run, long jump, wait then run."""
    h = horizon
    return [[7] * h, [8] * 4 + [7] * (h - 4), [8] * h, [4] * 4 + [7] * (h - 4)]


def _x_offset(env) -> int | None:
    """Byte offset of the agent's x position in the serialised state: the float32 that grows under RIGHT and not under
    LEFT (probed from the current state, which is restored). None when no such float is found."""
    snapshot = env.get_state()
    ends = {}
    for a in (7, 1):
        env.set_state(snapshot)
        for _ in range(8):
            env.act(np.array([a]))
        ends[a] = env.get_state()[0]
    env.set_state(snapshot)
    base = snapshot[0]
    if not len(base) == len(ends[7]) == len(ends[1]):
        return None
    for align in range(4):
        m = (len(base) - align) // 4
        f0, fr, fl = (np.frombuffer(b[align : align + 4 * m], dtype=np.float32) for b in (base, ends[7], ends[1]))
        with np.errstate(all="ignore"):
            ok = np.isfinite(f0) & np.isfinite(fr) & np.isfinite(fl) & (np.abs(f0) < 1e3)
            hit = np.flatnonzero(ok & (fr - f0 > 0.5) & (fr - f0 < 10) & (fl - f0 <= 0.01))
        if len(hit):
            return align + 4 * int(hit[0])
    return None


def _x(env, offset: int | None, size: int) -> float:
    if offset is None:
        return 0.0
    state = env.get_state()[0]
    return float(np.frombuffer(state[offset : offset + 4], dtype=np.float32)[0]) if len(state) == size else 0.0


def _try(env, snapshot, seq: list[int], offset: int | None) -> tuple[float, int]:
    """Plays seq from snapshot -> (score, frames played): inf for the coin, -1e9 + frames survived for death, else
    the agent's x at the end."""
    env.set_state(snapshot)
    for j, a in enumerate(seq):
        env.act(np.array([a]))
        rew, _, first = env.observe()
        if first[0]:
            return (float("inf") if rew[0] > 0 else -1e9 + j), j + 1
    return _x(env, offset, len(snapshot[0])), len(seq)


def plan_episode(cfg: ExpertConfig, episode: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Plays one episode with the planner: frames (F, 64, 64, 3) uint8, actions (F-1,) int16, meta."""
    level = episode_level(cfg.split, cfg.seed, episode, cfg.num_levels)
    env = make_env(cfg.env, level, cfg.distribution_mode)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, SPLIT_LEVELS[cfg.split], episode, 1]))
    offset = _x_offset(env)
    frames, actions = [env.observe()[1]["rgb"][0].copy()], []
    success, ended, tries, xs = False, False, 0, []
    while len(frames) < cfg.max_frames and not ended:
        snapshot = env.get_state()
        xs.append(_x(env, offset, len(snapshot[0])))
        # No progress over the last 4 decisions (a wall, a pit to wait out, or no x probe): explore instead, taking
        # the first random sequence that survives, until x moves again.
        stuck = len(xs) >= 4 and xs[-1] - xs[-4] < 0.5
        best, best_score, best_played = None, -float("inf"), 0
        for seq in ([] if stuck else _fixed(cfg.horizon)) + [_sequence(rng, cfg) for _ in range(cfg.candidates)]:
            tries += 1
            score, played = _try(env, snapshot, seq, offset)
            if score > best_score:
                best, best_score, best_played = seq, score, played
            if score == float("inf") or (stuck and score > -1e9 + cfg.horizon):
                break
        if best_score == float("inf"):
            plan = best[:best_played]
        elif best_score <= -1e9 + cfg.horizon:  # every sequence dies: play the longest-lived one's start
            plan = best[: max(1, best_played - 1)]
        else:
            plan = best[: cfg.commit]
        env.set_state(snapshot)
        for a in plan:
            env.act(np.array([a]))
            rew, obs, first = env.observe()
            if first[0]:  # the episode ended: this observation already belongs to the next one
                success, ended = bool(rew[0] > 0), True
                break
            actions.append(a)
            frames.append(obs["rgb"][0].copy())
            if len(frames) >= cfg.max_frames:
                break
    meta = {"episode": episode, "level": level, "success": success, "return": 10.0 if success else 0.0,
            "planner_tries": tries, "x_probe": offset is not None}
    return np.stack(frames), np.array(actions, dtype=np.int16), meta


def record(cfg: ExpertConfig, out: Path, workers: int = 1, progress: bool = True) -> dict:
    """Writes cfg.episodes expert episodes (true actions kept) to the dataset directory `out`; returns a summary."""
    writer = ShardWriter(out)
    bar = tqdm(total=cfg.episodes, desc=f"expert {cfg.env}/{cfg.split}", disable=not progress, unit="ep")
    successes = 0
    for frames, actions, meta in _episodes(cfg, workers):
        writer.add(frames, actions, meta)
        successes += meta["success"]
        bar.update(1)
    bar.close()
    info = {"source": "procgen-expert", "config": asdict(cfg), "num_true_actions": len(ACTION_NAMES),
            "action_names": list(ACTION_NAMES), "success_rate": successes / cfg.episodes}
    writer.close(info)
    return {"episodes": cfg.episodes, "frames": writer.total_frames, "success_rate": successes / cfg.episodes,
            "out": str(out)}


def _episodes(cfg: ExpertConfig, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
    """Each episode in episode order (so the recording is independent of `workers`)."""
    if workers <= 1:
        for i in range(cfg.episodes):
            yield plan_episode(cfg, i)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(plan_episode, [cfg] * cfg.episodes, range(cfg.episodes), chunksize=4)
