"""Controllability against the real game: does each arrow key do in the world what it does in the simulator?

For each level of a split, the real game walks right a few frames and idles until the scene stands still, at a spot
where both RIGHT and LEFT move the scene (further spots are tried; a level where none works is skipped). The last
frames it showed are the prompt. From one `get_state` snapshot the game holds each of RIGHT, LEFT, UP and NOOP for
`horizon` frames; the world gets the same prompt and holds each of its latent actions as long. Then:

- per key (bound to a latent): **accuracy**, the share of levels where, of the game's four frames, the one nearest
  (MSE) to the world's is that key's (chance ~0.25); **direction agreement**, the share of levels where the scene's
  shift in the world (best integer shift, horizontal for left/right, vertical for up) has the game's sign;
- per latent: its mean shift and how often its frame is nearest each key's, from which keys are *calibrated*
  (`calibrate_keys`: each key to the latent nearest its game frame most often, each latent at most once);
- the LAM's motion labels: clips of the real game walking right, walking left, standing and jumping from the same
  spots, labelled by the LAM; per motion the majority latent and its share, and whether the majorities differ.

Everything is a pure function of (world, env, split, levels, seed): the sampling seeds are fixed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from genie.sampling import World

# The keys tested and the Procgen action each one holds in the game (genie.data.procgen.ACTION_NAMES order).
KEY_ACTIONS = {"right": 7, "left": 1, "up": 5, "noop": 4}
MOTIONS = {"walk right": 7, "walk left": 1, "stand": 4, "jump": 5}  # the LAM's motion test: clips of each
NOOP = 4
RIGHT = 7
RIGHT_UP = 8
MAX_SHIFT = 8  # pixels searched each way for the best integer shift between consecutive frames


@dataclass(frozen=True)
class ControlConfig:
    env: str = "coinrun"
    split: str = "test"  # levels from this split's range (genie.data.procgen.SPLIT_LEVELS)
    levels: int = 16  # levels evaluated (skipped levels are replaced by further ones, up to 3x as many tried)
    seed: int = 0
    distribution_mode: str = "easy"
    horizon: int = 6  # H: frames each key is held
    walk_frames: int = 6  # frames the game walks right before idling (and jumps right between spots)
    min_shift: int = 3  # a spot counts when RIGHT and LEFT each scroll the scene by >= this many pixels (and not
    # vertically)
    settle_frames: int = 40  # at most this many NOOP frames to stand still
    spots: int = 4  # spots tried per level
    prompt_frames: int = 4  # game frames given to the world as its prompt (the last ones before the snapshot)
    motion_frames: int = 7  # transitions in each LAM motion clip (clip = the frame before + these)
    sample_seed: int = 0  # the world's sampling seed for every session

    def __post_init__(self) -> None:
        if self.levels < 1 or self.horizon < 1 or self.spots < 1 or self.prompt_frames < 1 or self.min_shift < 1:
            raise ValueError("levels, horizon, spots, prompt_frames and min_shift must be >= 1")
        if self.walk_frames < 1 or self.settle_frames < 1 or self.motion_frames < 1:
            raise ValueError("walk_frames, settle_frames and motion_frames must be >= 1")
        if self.distribution_mode not in ("easy", "hard"):
            raise ValueError(f"distribution_mode must be easy or hard, got {self.distribution_mode!r}")


@dataclass
class Probe:
    """One level's test: the prompt, the game's frame after each key, and the LAM motion clips."""

    level: int
    prompt: np.ndarray  # (P, H, W, C) uint8, the last game frames before the snapshot
    game: dict[str, np.ndarray]  # key -> (horizon, H, W, C) uint8 frames while holding it
    clips: dict[str, np.ndarray]  # motion -> (motion_frames + 1, H, W, C) uint8


def best_shift(before: np.ndarray, after: np.ndarray, max_shift: int = MAX_SHIFT) -> tuple[int, int]:
    """The integer shift (dy, dx) that best maps `before` onto `after` (after[y, x] ~ before[y - dy, x - dx], MSE
    over the overlap), searched jointly in both axes; the smaller shift wins ties, so a still scene has (0, 0).
    Meant for consecutive frames: CoinRun's tiled backdrop repeats, so a wide search between distant frames (or a
    search of one axis while the camera also moves along the other) can alias."""
    a, b = before.astype(np.float32), after.astype(np.float32)
    h, w = a.shape[:2]
    best, best_err = (0, 0), float("inf")
    shifts = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
    for dy, dx in sorted(shifts, key=lambda s: (abs(s[0]) + abs(s[1]), s)):
        src = a[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
        dst = b[max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
        err = float(np.mean((src - dst) ** 2))
        if err < best_err - 1e-6:
            best, best_err = (dy, dx), err
    return best


def scene_motion(start: np.ndarray, frames: np.ndarray) -> tuple[int, int]:
    """How far the scene moved, (dy, dx), over `frames` (F, H, W, C) after `start`: the sum of the best shifts
    between consecutive frames."""
    seq = [start, *frames]
    steps = [best_shift(a, b) for a, b in zip(seq[:-1], seq[1:], strict=True)]
    return sum(dy for dy, _ in steps), sum(dx for _, dx in steps)


def scene_shift(start: np.ndarray, frames: np.ndarray, axis: int) -> int:
    """scene_motion along one axis (0 = vertical, 1 = horizontal)."""
    return scene_motion(start, frames)[axis]


def _hold(env, action: int, frames: int) -> list[np.ndarray]:
    return _hold_until_end(env, action, frames)[0]


def _hold_until_end(env, action: int, frames: int) -> tuple[list[np.ndarray], bool]:
    """The frames while holding `action`, and whether the episode ended meanwhile (the agent died or took the coin:
    the game then shows the next level, which is not what the key did)."""
    out, ended = [], False
    for _ in range(frames):
        env.act(np.array([action]))
        out.append(env.observe()[1]["rgb"][0].copy())
        ended = ended or _episode_ended(env)
    return out, ended


def _episode_ended(env) -> bool:
    return bool(env.observe()[2][0])


def probe_level(env, level: int, cfg: ControlConfig) -> Probe | None:
    """Plays the level up to a spot where RIGHT and LEFT both scroll the scene and records the test there; None
    when no spot among cfg.spots works (or the episode ends first)."""
    history = [env.observe()[1]["rgb"][0].copy()]
    for spot in range(cfg.spots):
        if spot:  # the last spot was blocked (a wall, a ledge): jump right past it
            history += _hold(env, RIGHT_UP, cfg.walk_frames)
        history += _hold(env, RIGHT, cfg.walk_frames)
        for _ in range(cfg.settle_frames):  # idle until two frames in a row are identical
            history += _hold(env, NOOP, 1)
            if np.array_equal(history[-1], history[-2]):
                break
        if _episode_ended(env):
            return None
        snapshot = env.get_state()
        last = history[-1]
        held = {}  # action -> the frames while holding it from the snapshot (keys and motions share actions)
        ended = False
        for action in {*KEY_ACTIONS.values(), *MOTIONS.values()}:
            env.set_state(snapshot)
            frames, end = _hold_until_end(env, action, max(cfg.horizon, cfg.motion_frames))
            held[action], ended = np.stack(frames), ended or end
        env.set_state(snapshot)
        if ended:  # a key ends the episode here (a monster, lava, the coin): not a spot to test keys; walk on
            continue
        game = {key: held[action][: cfg.horizon] for key, action in KEY_ACTIONS.items()}
        clips = {m: np.concatenate([last[None], held[action][: cfg.motion_frames]]) for m, action in MOTIONS.items()}
        # A clean spot: RIGHT and LEFT each scroll the scene sideways and keep the agent on its floor (no fall off a
        # ledge, whose camera jump would blur what the key did).
        moves = [scene_motion(last, game[k]) for k in ("right", "left")]
        if all(dy == 0 for dy, _ in moves) and min(abs(dx) for _, dx in moves) >= cfg.min_shift:
            prompt = np.stack(history[-cfg.prompt_frames:])
            return Probe(level, prompt, game, clips)
    return None


def collect_probes(cfg: ControlConfig) -> tuple[list[Probe], int]:
    """Probes of cfg.levels levels of the split (level seeds from (seed, split, i)); returns them and how many
    levels were tried."""
    from genie.agent.expert import episode_level, make_env

    probes: list[Probe] = []
    tried = 0
    while len(probes) < cfg.levels and tried < 3 * cfg.levels:
        level = episode_level(cfg.split, cfg.seed, tried, 10_000)
        tried += 1
        env = make_env(cfg.env, level, cfg.distribution_mode)
        probe = probe_level(env, level, cfg)
        if probe is not None:
            probes.append(probe)
    return probes, tried


@torch.no_grad()
def world_frames(world: World, probes: list[Probe], cfg: ControlConfig, batch_size: int = 64) -> np.ndarray:
    """Each latent held `horizon` steps from each probe's prompt: (A, L, horizon, H, W, C) uint8 frames."""
    num_actions = world.num_actions
    prompt_len = min(cfg.prompt_frames, world.window - 1)
    prompts = torch.from_numpy(np.stack([p.prompt[-prompt_len:] for p in probes]))  # (L, P, H, W, C)
    jobs = [(a, i) for a in range(num_actions) for i in range(len(probes))]
    out = np.zeros((num_actions, len(probes), cfg.horizon, *probes[0].prompt.shape[1:]), dtype=np.uint8)
    for lo in range(0, len(jobs), batch_size):
        chunk = jobs[lo : lo + batch_size]
        states, frame = world.reset(prompts[[i for _, i in chunk]], [cfg.sample_seed] * len(chunk))
        actions = [a for a, _ in chunk]
        for t in range(cfg.horizon):
            states, frame = world.step(states, actions)
            for (a, i), f in zip(chunk, frame.cpu().numpy(), strict=True):
                out[a, i, t] = f
    return out


def _nearest_key(frames: np.ndarray, game: dict[str, np.ndarray]) -> str:
    """The key whose game frame after `horizon` steps is nearest (MSE) the world's last frame."""
    last = frames[-1].astype(np.float32)
    errs = {k: float(np.mean((last - g[-1].astype(np.float32)) ** 2)) for k, g in game.items()}
    return min(errs, key=errs.get)


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def latent_table(frames: np.ndarray, probes: list[Probe]) -> list[dict[str, Any]]:
    """Per latent: how often its frame is nearest each key's game frame, and the mean shift it causes."""
    table = []
    for a in range(frames.shape[0]):
        nearest = Counter(_nearest_key(frames[a, i], p.game) for i, p in enumerate(probes))
        dy, dx = zip(*(scene_motion(p.prompt[-1], frames[a, i]) for i, p in enumerate(probes)), strict=True)
        table.append({
            "latent": a,
            "nearest": {k: nearest.get(k, 0) / len(probes) for k in KEY_ACTIONS},
            "mean_dx": float(np.mean(dx)), "mean_dy": float(np.mean(dy)),
        })
    return table


def calibrate_keys(table: list[dict[str, Any]], keys: tuple[str, ...] = ("right", "left", "up")) -> dict[str, int | None]:
    """Each key to the latent whose frame is nearest that key's game frame most often, strongest pairs first, each
    latent at most once; a key no latent matches better than chance (0.25) stays unbound."""
    pairs = sorted(((row["nearest"][k], k, row["latent"]) for row in table for k in keys), reverse=True)
    bound: dict[str, int | None] = dict.fromkeys(keys)
    used: set[int] = set()
    for share, key, latent in pairs:
        if bound[key] is None and latent not in used and share > 0.25:
            bound[key] = latent
            used.add(latent)
    return bound


def key_scores(frames: np.ndarray, probes: list[Probe], keys: dict[str, int | None]) -> dict[str, dict[str, Any]]:
    """Per key: accuracy and direction agreement of its bound latent (None for an unbound key)."""
    out: dict[str, dict[str, Any]] = {}
    for key in KEY_ACTIONS:
        latent = keys.get(key)
        if latent is None:
            out[key] = {"latent": None, "accuracy": None, "direction_agreement": None}
            continue
        hits = [_nearest_key(frames[latent, i], p.game) == key for i, p in enumerate(probes)]
        row: dict[str, Any] = {"latent": latent, "accuracy": float(np.mean(hits)), "levels": len(probes)}
        if key != "noop":
            axis = 0 if key == "up" else 1
            agree, counted = 0, 0
            for i, p in enumerate(probes):
                game = _sign(scene_shift(p.prompt[-1], p.game[key], axis))
                if game == 0:  # the game did not move this way here: nothing to agree with
                    continue
                counted += 1
                agree += _sign(scene_shift(p.prompt[-1], frames[latent, i], axis)) == game
            row["direction_agreement"] = agree / counted if counted else None
            row["direction_levels"] = counted
        out[key] = row
    return out


def motion_labels(lam, probes: list[Probe], motion: str) -> tuple[np.ndarray, np.ndarray]:
    """A motion's clips of every probe, cut to the LAM's window, and the LAM's labels of their transitions:
    (L, T, H, W, C) uint8, (L, T-1) int64."""
    clips = np.stack([p.clips[motion] for p in probes])[:, : lam.cfg.max_frames]  # (L, T, H, W, C)
    return clips, lam.infer_actions(torch.from_numpy(clips)).numpy()


def lam_motions(lam, probes: list[Probe]) -> dict[str, Any]:
    """The LAM's labels of the game's motion clips: per motion the majority latent and its share of the transitions,
    and whether the four majorities are distinct."""
    per: dict[str, Any] = {}
    for motion in MOTIONS:
        labels = motion_labels(lam, probes, motion)[1].flatten().tolist()
        counts = Counter(labels)
        majority, n = counts.most_common(1)[0]
        per[motion] = {"majority": majority, "share": n / len(labels), "transitions": len(labels),
                       "counts": {str(k): v for k, v in sorted(counts.items())}}
    majorities = [v["majority"] for v in per.values()]
    return {"motions": per, "distinct": len(set(majorities)) == len(majorities),
            "min_share": min(v["share"] for v in per.values())}


def evaluate_control(world: World, lam, cfg: ControlConfig, keys: dict[str, int | None] | None = None,
                     probes: list[Probe] | None = None) -> dict[str, Any]:
    """The controllability report. keys: the bindings to score (None = calibrate on these same levels, which the
    report says; calibrate on another split and pass them in for a held-out score)."""
    if probes is None:
        probes, tried = collect_probes(cfg)
    else:
        tried = len(probes)
    if not probes:
        raise ValueError(f"no level of {cfg.env}/{cfg.split} had a spot where RIGHT and LEFT move the scene")
    frames = world_frames(world, probes, cfg)
    table = latent_table(frames, probes)
    calibrated = calibrate_keys(table)
    scored = dict(keys) if keys is not None else {**calibrated, "noop": None}
    if scored.get("noop") is None:  # NOOP: the latent most often nearest the standing frame, among the unbound
        free = [r for r in table if r["latent"] not in {v for v in scored.values() if v is not None}]
        scored["noop"] = max(free, key=lambda r: r["nearest"]["noop"])["latent"] if free else None
    report = {
        "config": asdict(cfg),
        "levels": [p.level for p in probes],
        "levels_tried": tried,
        "keys_scored": scored,
        "keys_from": "given" if keys is not None else "calibrated on these levels",
        "calibrated_keys": calibrated,
        "keys": key_scores(frames, probes, scored),
        "latents": table,
    }
    if lam is not None:
        report["lam_motions"] = lam_motions(lam, probes)
    return report


def control_summary(control: dict[str, Any]) -> dict[str, Any]:
    """The headline of a controllability report: bindings, held-out accuracy and direction agreement per key, and
    the LAM's motion majorities."""
    test = control["test"]
    out = {"keys": control["keys"],
           "test": {k: {f: v.get(f) for f in ("latent", "accuracy", "direction_agreement")}
                    for k, v in test["keys"].items()}}
    if "lam_motions" in test:
        out["lam_motions"] = {m: {"majority": v["majority"], "share": round(v["share"], 3)}
                              for m, v in test["lam_motions"]["motions"].items()}
        out["lam_motions_distinct"] = test["lam_motions"]["distinct"]
    return out
