"""The reactive expert: the search planner (genie/agent/expert.py) distilled by DAgger into a policy that acts from the
frames it sees, so that its behaviour is in its videos.

The planner decides from a 24-frame look-ahead through the simulator's save/restore, which no frame shows; a clone of
its recordings learns only its action statistics. DAgger (Ross et al., 2011) fixes what the student sees: iteration 0
plays the planner and records, for every frame, the planner's choice there (the first action of its best sequence
from that state); each later iteration plays the student (the planner with probability beta_i, which decays), and
the planner labels every state the student visits, including the ones its own mistakes lead to. The student is
trained on all labels so far after each iteration. Episodes of every iteration are on fresh train-split levels.

A run directory holds:
    config.json                 the ReactiveConfig (a resumed run must match it)
    iteration_<i>/              that iteration's episodes as dataset shards (frames; actions = the planner's labels)
    iteration_<i>/policy/       the student after training on iterations 0..i (config.json + model.safetensors)
    metrics.jsonl               one line per iteration: episodes, frames, success of the rollouts, training accuracy
An interrupted run resumes at the first iteration without a policy (an iteration's data are rewritten whole); a
finished run is extended by running it again with more iterations.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from genie.agent.expert import (
    ExpertConfig,
    _fixed,
    _sequence,
    _try,
    _x_offset,
    episode_level,
    make_env,
)
from genie.agent.policy import Policy, PolicyConfig, context_frames, random_shift
from genie.config import from_dict
from genie.data.procgen import ACTION_NAMES, SPLIT_LEVELS
from genie.data.shards import ShardedDataset, ShardWriter

log = logging.getLogger(__name__)
# Worker processes start fresh: this process has run torch (OpenMP), and a forked child of it can hang in libgomp.
_SPAWN = multiprocessing.get_context("spawn")
TARGETS_FILE = "near_optimal.safetensors"  # an iteration's (labelled frames, A) uint8 near-optimal action sets
# The least action first: walk right, jump right, wait, jump, walk left, jump left, then the rest in index order.
_LEAST_FIRST = (7, 8, 4, 5, 1, 2)
PREFERENCE = _LEAST_FIRST + tuple(a for a in range(len(ACTION_NAMES)) if a not in _LEAST_FIRST)


@dataclass(frozen=True)
class ReactiveConfig:
    env: str = "coinrun"
    distribution_mode: str = "easy"
    seed: int = 0
    num_levels: int = 10_000  # train-split levels the episodes draw from
    iterations: int = 4  # DAgger iterations (iteration 0 plays the planner)
    episodes: int = 48  # episodes (levels) per iteration
    max_frames: int = 400
    beta_decay: float = 0.5  # beta_i = beta_decay ** i: the share of frames the planner acts in iteration i
    candidates: int = 8  # the planner's random sequences per decision (after its fixed ones)
    # Frames the labelling planner looks ahead. Re-planning every frame on an x-at-the-end score, 24 frames is too short
    # to see past a tall wall: the planner ran into it until the episode timed out on 13 of 96 train levels (0.84
    # success; 24 candidates: 0.78); 48 frames: 0.95 on the same levels (5 timeouts).
    horizon: int = 48
    tolerance: float = 1.0  # a first action is near-optimal when its best sequence ends within this x of the best
    context: int = 2  # frames the student sees (the current one and the one before)
    width_mult: int = 32
    arch: str = "nature"  # the student's trunk (PolicyConfig.arch): "nature" or "impala"
    augment: int = 0  # pixels of random shift applied to the student's training frames (0: none)
    # True: the student's target is the least action of each near-optimal set (PREFERENCE: walk unless a jump is
    # needed), not the whole set. With whole sets a student learns to jump right almost everywhere (it is nearly always
    # acceptable in easy CoinRun), and its choices hardly depend on what the frame shows.
    least_action: bool = False
    # Rows whose near-optimal set excludes the default action (the one near-optimal in the most rows: jumping right,
    # in easy CoinRun) weigh this much in the student's loss. Those are the states where the default kills or stalls
    # (a saw ahead, a wall to wait out), about 12% of the labels; at weight 1 a student trained on sets got 24% of
    # them right on its own training frames, 13% on new levels, and died there.
    critical_weight: float = 1.0
    steps: int = 1500  # training steps after each iteration, on all labels so far
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 1e-4
    workers: int = 2

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.episodes < 1 or self.steps < 1 or self.batch_size < 1 or self.workers < 1:
            raise ValueError(f"iterations, episodes, steps, batch_size and workers must be >= 1, got {self}")
        if self.critical_weight <= 0:
            raise ValueError(f"critical_weight must be > 0, got {self.critical_weight}")
        if self.augment < 0:
            raise ValueError(f"augment must be >= 0 pixels, got {self.augment}")
        if not 0 <= self.beta_decay <= 1:
            raise ValueError(f"beta_decay must be in [0, 1], got {self.beta_decay}")
        ExpertConfig(env=self.env, seed=self.seed, num_levels=self.num_levels, distribution_mode=self.distribution_mode,
                     max_frames=self.max_frames, candidates=self.candidates, horizon=self.horizon, commit=1)

    def policy_config(self) -> PolicyConfig:
        return PolicyConfig(num_actions=len(ACTION_NAMES), context=self.context, width_mult=self.width_mult,
                            arch=self.arch)

    def beta(self, iteration: int) -> float:
        return self.beta_decay ** iteration


def planner_targets(env, offset: int | None, rng: np.random.Generator, cfg: ReactiveConfig) -> tuple[int, np.ndarray]:
    """The planner's view of the env's current state: its choice (the first action of its best sequence, as
    plan_episode scores them: the coin beats everything, death loses, else the agent's x at the end; ties go to the
    fixed sequences) and the near-optimal first actions, (A,) bool: those whose best sequence reaches the coin when
    the best does, or survives and ends within cfg.tolerance of the best x. Where running and jumping right are both
    fine the set holds both, and where only a jump survives it holds only the jump: the student learns the decision
    the frame shows, not the tie the planner's random candidates broke. The env is left in the state it was in."""
    snapshot = env.get_state()
    ecfg = ExpertConfig(horizon=cfg.horizon, candidates=cfg.candidates, commit=1)
    best_of: dict[int, float] = {}  # first action -> its best sequence's score
    best, best_score = None, -float("inf")
    for seq in _fixed(cfg.horizon) + [_sequence(rng, ecfg) for _ in range(cfg.candidates)]:
        score, _ = _try(env, snapshot, seq, offset)
        best_of[seq[0]] = max(best_of.get(seq[0], -float("inf")), score)
        if score > best_score:
            best, best_score = seq, score
    env.set_state(snapshot)
    near = np.zeros(len(ACTION_NAMES), dtype=bool)
    for action, score in best_of.items():
        if best_score == float("inf"):
            near[action] = score == float("inf")
        elif best_score <= -1e9 + cfg.horizon:  # every sequence dies: the longest-lived ones
            near[action] = score == best_score
        else:
            near[action] = score > -1e9 + cfg.horizon and score >= best_score - cfg.tolerance
    near[int(best[0])] = True
    return int(best[0]), near


def planner_choice(env, offset: int | None, rng: np.random.Generator, cfg: ReactiveConfig) -> int:
    """The planner's action in the env's current state (planner_targets' choice)."""
    return planner_targets(env, offset, rng, cfg)[0]


def rollout(cfg: ReactiveConfig, iteration: int, episode: int,
            weights: dict[str, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """One DAgger episode on a fresh train-split level: frames (F, H, W, C), the planner's label of every frame but
    the last (F-1,), its near-optimal actions there (F-1, A) bool, meta. The student acts with probability 1 - beta
    (sampling its softmax); without weights the planner plays throughout."""
    torch.set_num_threads(1)
    index = iteration * cfg.episodes + episode  # distinct levels across iterations
    level = episode_level("train", cfg.seed, index, cfg.num_levels)
    env = make_env(cfg.env, level, cfg.distribution_mode)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, SPLIT_LEVELS["train"], index, 7]))
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    policy = None
    if weights is not None:
        policy = Policy(cfg.policy_config()).eval()
        policy.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    beta = 1.0 if policy is None else cfg.beta(iteration)
    offset = _x_offset(env)
    frames, labels, masks, success, student_frames = [env.observe()[1]["rgb"][0].copy()], [], [], False, 0
    while len(frames) < cfg.max_frames:
        label, near = planner_targets(env, offset, rng, cfg)
        masks.append(near)
        action = label
        if policy is not None and rng.random() >= beta:
            ctx = context_frames(np.stack(frames[-cfg.context:]), np.array([len(frames[-cfg.context:]) - 1]), cfg.context)
            action = int(policy.act(torch.from_numpy(ctx), generator=gen)[0])
            student_frames += 1
        labels.append(label)
        env.act(np.array([action]))
        rew, obs, first = env.observe()
        if first[0]:
            success = bool(rew[0] > 0)
            labels.pop()  # the episode ended: the frame it led to belongs to the next level, and is not kept
            masks.pop()
            break
        frames.append(obs["rgb"][0].copy())
    meta = {"iteration": iteration, "episode": episode, "level": level, "success": success,
            "return": 10.0 if success else 0.0, "beta": beta, "student_frames": student_frames, "labels": len(labels)}
    near = np.stack(masks) if masks else np.zeros((0, len(ACTION_NAMES)), dtype=bool)
    return np.stack(frames[: len(labels) + 1]), np.array(labels, dtype=np.int16), near, meta


def _in_workers(fn, jobs: list[tuple], workers: int):
    """fn(*job) for each job, in job order: in this process with one worker, else in `workers` spawned processes."""
    if workers <= 1:
        threads = torch.get_num_threads()
        try:
            for job in jobs:
                yield fn(*job)
        finally:
            torch.set_num_threads(threads)  # fn runs its policy on one thread, as a worker process does
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=_SPAWN) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        for future in futures:  # in job order: the output does not depend on which worker finished first
            yield future.result()


def _weights(policy: Policy) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in policy.state_dict().items()}


def save_policy(policy: Policy, directory: Path) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(asdict(policy.cfg), indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def load_reactive_policy(directory: Path) -> Policy:
    """A student saved by `save_policy` (a run's iteration_<i>/policy/, or the run's policy/)."""
    cfg = from_dict(PolicyConfig, json.loads((Path(directory) / "config.json").read_text()))
    policy = Policy(cfg)
    policy.load_state_dict(load_file(Path(directory) / "model.safetensors"))
    return policy.eval()


def _collect(cfg: ReactiveConfig, iteration: int, weights: dict[str, np.ndarray] | None, out: Path) -> list[dict]:
    """Plays an iteration's episodes (in worker processes) into shards at `out`; returns their metas."""
    shutil.rmtree(out, ignore_errors=True)
    writer = ShardWriter(out)
    metas, masks = [], []
    for frames, labels, near, meta in _in_workers(rollout, [(cfg, iteration, e, weights) for e in range(cfg.episodes)],
                                                  cfg.workers):
        writer.add(frames, labels, meta)
        masks.append(near)
        metas.append(meta)
    writer.close({"source": "reactive-dagger", "config": asdict(cfg), "iteration": iteration,
                  "num_true_actions": len(ACTION_NAMES), "action_names": list(ACTION_NAMES)})
    # The near-optimal sets, every labelled frame of the iteration in episode order (beside the shards' labels).
    save_file({"near_optimal": torch.from_numpy(np.concatenate(masks).astype(np.uint8))}, out / TARGETS_FILE)
    return metas


def _examples(dirs: list[Path]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Every labelled frame of the iterations so far: episode frame arrays, (row -> episode, t), the near-optimal
    action sets (rows, A) bool."""
    episodes, index, near = [], [], []
    for d in dirs:
        data = ShardedDataset(d)
        for i in range(len(data.episodes)):
            frames, actions = data.episode(i)
            e = len(episodes)
            episodes.append(np.asarray(frames))
            index += [(e, t) for t in range(len(actions))]
        near.append(load_file(d / TARGETS_FILE)["near_optimal"].numpy().astype(bool))
    near_all = np.concatenate(near)
    if len(near_all) != len(index):
        raise ValueError(f"{dirs}: {len(index)} labelled frames but {len(near_all)} near-optimal sets")
    return episodes, np.array(index, dtype=np.int64), near_all


def least_action(near: np.ndarray) -> np.ndarray:
    """(rows, A) bool near-optimal sets -> (rows, A) one-hot sets holding each set's first action in PREFERENCE."""
    order = near[:, PREFERENCE]  # (rows, A) in preference order
    first = np.asarray(PREFERENCE)[order.argmax(1)]  # every set holds at least the planner's choice
    out = np.zeros_like(near)
    out[np.arange(len(near)), first] = True
    return out


def critical_rows(near: np.ndarray) -> np.ndarray:
    """(rows, A) bool near-optimal sets -> (rows,) bool: the rows whose set excludes the default action, the one
    near-optimal in the most rows."""
    return ~near[:, int(near.sum(0).argmax())]


def train_student(policy: Policy, cfg: ReactiveConfig, dirs: list[Path], iteration: int) -> float:
    """`cfg.steps` AdamW steps on every labelled frame of `dirs` (batches a function of (seed, iteration, step)),
    maximising the probability the student gives the near-optimal set: any of its actions is what the planner
    would accept; critical rows (critical_rows) weigh cfg.critical_weight. Returns the share of the last 200 steps'
    frames whose argmax is in the set."""
    episodes, index, near = _examples(dirs)
    weight = torch.from_numpy(np.where(critical_rows(near), cfg.critical_weight, 1.0).astype(np.float32))  # (rows,)
    if cfg.least_action:
        near = least_action(near)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, iteration, 11]))
    policy.train()
    correct, seen = 0, 0
    for step in range(cfg.steps):
        rows = rng.integers(len(index), size=cfg.batch_size)
        ctx = np.stack([context_frames(episodes[e], np.array([t]), cfg.context)[0] for e, t in index[rows]])
        ctx = random_shift(ctx, cfg.augment, rng)  # (B, context, H, W, C)
        allowed = torch.from_numpy(near[rows])  # (B, A) bool
        logits = policy(torch.from_numpy(ctx))
        logp = F.log_softmax(logits, -1)
        w = weight[rows]  # (B,)
        loss = -(w * torch.logsumexp(logp.masked_fill(~allowed, -float("inf")), -1)).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= cfg.steps - 200:
            correct += int(allowed.gather(1, logits.argmax(-1, keepdim=True)).sum())
            seen += len(rows)
    policy.eval()
    return correct / max(seen, 1)


def finished_policy_dir(run: Path) -> Path:
    """The reactive expert of a finished run (`run/policy`); ValueError when the run has not finished."""
    directory = Path(run) / "policy"
    if not (directory / "model.safetensors").is_file():
        raise ValueError(f"{run} holds no finished reactive expert (no policy/model.safetensors): run "
                         f"`genie agent reactive --out {run}` to the end first")
    return directory


def check_run(cfg: ReactiveConfig, run: Path) -> None:
    """ValueError when `run` holds a run of another config. More iterations extend a run (its finished ones are
    kept); any other change is another run. A run saved before a field existed ran with that field's default."""
    cfg_file = Path(run) / "config.json"
    if not cfg_file.exists():
        return
    saved = {**json.loads(json.dumps(asdict(ReactiveConfig()))), **json.loads(cfg_file.read_text())}
    wanted = json.loads(json.dumps(asdict(cfg)))
    if {k: v for k, v in saved.items() if k != "iterations"} != {k: v for k, v in wanted.items() if k != "iterations"}:
        raise ValueError(f"{run} holds a run with another config; use another directory")


def run_dagger(cfg: ReactiveConfig, run: Path, progress: bool = True,
               on_iteration: Callable[[int], bool] | None = None) -> dict[str, Any]:
    """Runs (or resumes) the DAgger iterations in `run`; returns the last iteration's metrics. on_iteration(done) is
    called after each finished iteration (done = iterations finished); True stops the run there (a job cancelled),
    and the result then has "stopped": True."""
    check_run(cfg, run)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(json.loads(json.dumps(asdict(cfg))), indent=2))
    torch.manual_seed(cfg.seed)
    policy = Policy(cfg.policy_config())
    last: dict[str, Any] = {}
    for i in range(cfg.iterations):
        done = run / f"iteration_{i}" / "policy"
        if (done / "model.safetensors").exists():
            policy = load_reactive_policy(done)
            continue
        t0 = time.monotonic()
        weights = None if i == 0 else _weights(policy)
        metas = _collect(cfg, i, weights, run / f"iteration_{i}")
        t1 = time.monotonic()
        accuracy = train_student(policy, cfg, [run / f"iteration_{j}" for j in range(i + 1)], i)
        save_policy(policy, run / f"iteration_{i}" / "policy")
        last = {"iteration": i, "beta": cfg.beta(i), "episodes": len(metas),
                "rollout_success": float(np.mean([m["success"] for m in metas])),
                "student_frames": int(sum(m["student_frames"] for m in metas)),
                "labels": int(sum(m["labels"] for m in metas)),
                "train_accuracy": accuracy, "collect_s": round(t1 - t0, 1), "train_s": round(time.monotonic() - t1, 1)}
        with (run / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(last) + "\n")
        if progress:
            log.info("dagger iteration %d: %s", i, last)
        if on_iteration is not None and on_iteration(i + 1) and i + 1 < cfg.iterations:
            return {**last, "stopped": True}
    if not last and (run / "metrics.jsonl").exists():  # every iteration was finished before: the newest metrics
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    final = run / f"iteration_{cfg.iterations - 1}" / "policy"
    save_policy(load_reactive_policy(final), run / "policy")
    return last


def _play_reactive(policy_dir: str, cfg: ExpertConfig, episode: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One episode of the reactive expert on the level `episode` of cfg's split: frames, its actions, meta."""
    torch.set_num_threads(1)
    policy = load_reactive_policy(Path(policy_dir))
    context = policy.cfg.context
    level = episode_level(cfg.split, cfg.seed, episode, cfg.num_levels)
    env = make_env(cfg.env, level, cfg.distribution_mode)
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, SPLIT_LEVELS[cfg.split], episode, 3])
                                            .generate_state(1)[0]))
    frames, actions, success = [env.observe()[1]["rgb"][0].copy()], [], False
    while len(frames) < cfg.max_frames:
        ctx = context_frames(np.stack(frames[-context:]), np.array([len(frames[-context:]) - 1]), context)
        action = int(policy.act(torch.from_numpy(ctx), generator=gen)[0])
        env.act(np.array([action]))
        rew, obs, first = env.observe()
        if first[0]:
            success = bool(rew[0] > 0)
            break
        actions.append(action)
        frames.append(obs["rgb"][0].copy())
    meta = {"episode": episode, "level": level, "success": success, "return": 10.0 if success else 0.0}
    return np.stack(frames), np.array(actions, dtype=np.int16), meta


def record_reactive(policy: Policy, cfg: ExpertConfig, out: Path, workers: int = 1, progress: bool = True,
                    policy_dir: Path | None = None) -> dict[str, Any]:
    """Writes cfg.episodes episodes of the reactive expert (its actions kept as the true actions) to the dataset
    directory `out`, like `expert.record` does for the planner; returns a summary."""
    from tqdm import tqdm

    tmp_dir = None
    if policy_dir is None:  # the workers load the policy from disk: no pickled tensors cross processes
        tmp_dir = Path(out).with_name(Path(out).name + ".policy.tmp")
        save_policy(policy, tmp_dir)
        policy_dir = tmp_dir
    writer = ShardWriter(out)
    successes = 0
    bar = tqdm(total=cfg.episodes, desc=f"reactive expert {cfg.env}/{cfg.split}", disable=not progress, unit="ep")
    try:
        for frames, actions, meta in _in_workers(_play_reactive, [(str(policy_dir), cfg, e) for e in range(cfg.episodes)],
                                                 workers):
            writer.add(frames, actions, meta)
            successes += meta["success"]
            bar.update(1)
    finally:
        bar.close()
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    info = {"source": "procgen-reactive-expert", "config": asdict(cfg), "num_true_actions": len(ACTION_NAMES),
            "action_names": list(ACTION_NAMES), "success_rate": successes / cfg.episodes}
    writer.close(info)
    return {"episodes": cfg.episodes, "frames": writer.total_frames, "success_rate": successes / cfg.episodes,
            "out": str(out)}
