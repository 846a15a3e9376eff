"""`genie agent finetune`: the reactive expert fine-tuned by RL in the real game (PPO, Schulman et al., 2017).

Why: DAgger distils a planner that sees 48 frames ahead into a student that sees two frames. Where the planner's
choice depends on what the frames do not show (the ground a high jump lands on, below the view), the student cannot
copy it and dies there (README, "Labels that see past a wall"). RL scores the student by its own success from its
own view, so it can learn what is safe to do with what it sees. The DAgger student is the starting point; a value
head (one linear layer on the policy's hidden features) is added and trained alone for the first `value_warmup`
updates, so that the first policy updates do not follow the advantages of an untrained critic.

The game runs `envs` train-split levels at once (Procgen's own vectorised env; a level ends and the next one starts
by itself); each update plays `rollout` frames in every env and takes `epochs` passes of clipped-surrogate PPO over
them. Rewards are the game's (10 for the coin) divided by 10.

A run directory holds:
    config.json            the FinetuneConfig (a resumed run must match it, but for `updates`)
    checkpoints/step_N/    policy + value head weights and the Adam state after N updates (safetensors + JSON)
    policy/                the fine-tuned policy (config.json + model.safetensors, as a DAgger run's policy/): what
                           `genie agent eval --reactive RUN` and `genie agent expert --reactive RUN` read
    metrics.jsonl          one JSON line per update: the episodes that ended in it (success, length), losses, KL
A resumed run continues from its newest checkpoint with fresh levels (the envs are seeded by the update it resumes at).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genie.agent.policy import Policy, PolicyConfig
from genie.agent.reactive import load_reactive_policy, save_policy
from genie.config import from_dict
from genie.data.procgen import ACTION_NAMES, SPLIT_LEVELS, combo_names, procgen_env_class
from genie.train.checkpoint import (
    checkpoint_dir,
    optimizer_to_flat,
    prune_checkpoints,
    resume_latest,
    save_checkpoint,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    init: str  # the policy to start from: a DAgger run (its policy/) or a policy directory
    env: str = "coinrun"
    distribution_mode: str = "easy"
    seed: int = 0
    num_levels: int = 10_000  # train-split levels [0, num_levels), those DAgger draws from
    envs: int = 32  # games played at once
    rollout: int = 128  # frames each game plays per update
    updates: int = 100
    epochs: int = 3
    minibatches: int = 4
    lr: float = 2e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    entropy: float = 0.01
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    value_warmup: int = 4  # updates that train only the value head
    checkpoint_every: int = 5

    def __post_init__(self) -> None:
        if min(self.envs, self.rollout, self.updates, self.epochs, self.minibatches, self.checkpoint_every) < 1:
            raise ValueError(f"envs, rollout, updates, epochs, minibatches and checkpoint_every must be >= 1, got {self}")
        if (self.envs * self.rollout) % self.minibatches:
            raise ValueError(f"envs * rollout ({self.envs * self.rollout}) must split into {self.minibatches} minibatches")
        if not (0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1 and self.clip > 0 and self.lr > 0):
            raise ValueError(f"need 0 < gamma <= 1, 0 <= gae_lambda <= 1, clip > 0, lr > 0; got {self}")
        if self.value_warmup < 0 or self.entropy < 0 or self.value_coef <= 0:
            raise ValueError(f"need value_warmup >= 0, entropy >= 0, value_coef > 0; got {self}")
        if self.distribution_mode not in ("easy", "hard"):
            raise ValueError(f"distribution_mode must be easy or hard, got {self.distribution_mode!r}")


class ActorCritic(nn.Module):
    """The policy and a value head on its hidden features: frames (B, context, H, W, C) uint8 -> logits (B, A),
    values (B,)."""

    def __init__(self, policy: Policy) -> None:
        super().__init__()
        self.cfg: PolicyConfig = policy.cfg
        self.policy = policy
        self.value = nn.Linear(policy.cfg.hidden, 1)
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.value.bias)

    def forward(self, frames: Tensor, value_only: bool = False) -> tuple[Tensor, Tensor]:
        h = self.policy.features(frames)  # (B, hidden)
        if value_only:  # the value head learns on features it does not change
            h = h.detach()
        return self.policy.head[2](h), self.value(h)[:, 0]


def policy_dir(init: str | Path) -> Path:
    """A DAgger (or fine-tune) run's policy/, or a policy directory itself; ValueError when it is neither, or when the
    policy does not act in the game's actions (a LAM-BC policy acts in latent ones)."""
    path = Path(init)
    if (path / "policy" / "model.safetensors").is_file():
        path = path / "policy"
    elif not (path / "model.safetensors").is_file():
        raise ValueError(f"{init} is neither a policy directory nor a run with a finished policy/")
    try:
        cfg = from_dict(PolicyConfig, json.loads((path / "config.json").read_text()))
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} holds no readable policy config.json: {exc}") from None
    if cfg.num_actions != len(ACTION_NAMES):
        raise ValueError(f"{path}: the policy has {cfg.num_actions} actions; a game policy has {len(ACTION_NAMES)} "
                         "(a LAM-BC policy's actions are latent ones, which the game does not take)")
    return path


def make_envs(cfg: FinetuneConfig, update: int):
    """`cfg.envs` games on the train split's levels, seeded by (seed, the update they start at)."""
    ProcgenGym3Env = procgen_env_class()  # noqa: N806 - a class
    seed = int(np.random.SeedSequence([cfg.seed, update, 13]).generate_state(1)[0]) & 0x7FFFFFFF
    env = ProcgenGym3Env(num=cfg.envs, env_name=cfg.env, start_level=SPLIT_LEVELS["train"], num_levels=cfg.num_levels,
                         distribution_mode=cfg.distribution_mode, rand_seed=seed)
    if combo_names(env.get_combos()) != ACTION_NAMES:
        raise ValueError(f"procgen's actions {combo_names(env.get_combos())} are not the expected {ACTION_NAMES}")
    return env


@dataclass
class Rollout:
    """One update's frames and what happened after each: T frames of N games."""

    frames: np.ndarray  # (T, N, context, H, W, C) uint8: what the policy saw
    actions: Tensor  # (T, N) int64
    logp: Tensor  # (T, N) log-probability of the action when it was taken
    values: Tensor  # (T, N)
    rewards: Tensor  # (T, N) the game's reward / 10
    dones: Tensor  # (T, N) 1.0 where the level ended after the action
    last_value: Tensor  # (N,) the value of the frame after the last
    episodes: list[dict[str, Any]]  # levels that ended: {"success", "length"}


class Player:
    """Plays the N games with the current policy, keeping each game's last `context` frames across updates."""

    def __init__(self, env, context: int) -> None:
        self.env, self.context = env, context
        _, obs, _ = env.observe()
        frame = obs["rgb"]  # (N, H, W, C)
        self.history = np.repeat(frame[:, None], context, axis=1)  # (N, context, H, W, C): the first frame repeated
        self.lengths = np.zeros(len(frame), dtype=np.int64)

    def _advance(self, frame: np.ndarray, first: np.ndarray) -> None:
        self.history = np.concatenate([self.history[:, 1:], frame[:, None]], axis=1)
        self.history[first] = frame[first][:, None]  # a new level: its first frame repeated, as at any start

    @torch.no_grad()
    def play(self, model: ActorCritic, steps: int, gen: torch.Generator) -> Rollout:
        n = len(self.history)
        frames = np.empty((steps, *self.history.shape), dtype=np.uint8)
        actions = torch.zeros(steps, n, dtype=torch.int64)
        logp, values, rewards, dones = (torch.zeros(steps, n) for _ in range(4))
        episodes: list[dict[str, Any]] = []
        for t in range(steps):
            frames[t] = self.history
            logits, value = model(torch.from_numpy(self.history))
            dist = F.log_softmax(logits, -1)  # (N, A)
            action = torch.multinomial(dist.exp(), 1, generator=gen)[:, 0]
            actions[t], logp[t], values[t] = action, dist.gather(1, action[:, None])[:, 0], value
            self.env.act(action.numpy().astype(np.int32))
            rew, obs, first = self.env.observe()
            self.lengths += 1
            for i in np.flatnonzero(first):
                episodes.append({"success": bool(rew[i] > 0), "length": int(self.lengths[i])})
                self.lengths[i] = 0
            rewards[t] = torch.from_numpy(np.asarray(rew, dtype=np.float32)) / 10.0
            dones[t] = torch.from_numpy(np.asarray(first, dtype=np.float32))
            self._advance(obs["rgb"], np.asarray(first, dtype=bool))
        _, last_value = model(torch.from_numpy(self.history))
        return Rollout(frames, actions, logp, values, rewards, dones, last_value, episodes)


def advantages(r: Rollout, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates (Schulman et al., 2016) and the value targets: (T, N) each."""
    steps = r.rewards.shape[0]
    adv = torch.zeros_like(r.rewards)
    running = torch.zeros_like(r.last_value)
    for t in reversed(range(steps)):
        live = 1.0 - r.dones[t]
        next_value = r.last_value if t == steps - 1 else r.values[t + 1]
        delta = r.rewards[t] + gamma * next_value * live - r.values[t]
        running = delta + gamma * lam * live * running
        adv[t] = running
    return adv, adv + r.values


def ppo_update(model: ActorCritic, opt: torch.optim.Optimizer, r: Rollout, cfg: FinetuneConfig, value_only: bool,
               gen: torch.Generator) -> dict[str, float]:
    """`cfg.epochs` passes of the clipped surrogate (or, with value_only, of the value loss alone) over the rollout."""
    adv, returns = advantages(r, cfg.gamma, cfg.gae_lambda)
    frames = r.frames.reshape(-1, *r.frames.shape[2:])  # (T*N, context, H, W, C)
    actions, old_logp, adv, returns = (x.reshape(-1) for x in (r.actions, r.logp, adv, returns))
    size = len(actions) // cfg.minibatches
    sums: dict[str, float] = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "approx_kl": 0.0, "clip_frac": 0.0}
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(actions), generator=gen)
        for m in range(cfg.minibatches):
            idx = order[m * size : (m + 1) * size]
            logits, value = model(torch.from_numpy(frames[idx.numpy()]), value_only=value_only)
            logp_all = F.log_softmax(logits, -1)  # (b, A)
            logp = logp_all.gather(1, actions[idx, None])[:, 0]
            ratio = (logp - old_logp[idx]).exp()
            a = adv[idx]
            a = (a - a.mean()) / (a.std() + 1e-8)
            policy_loss = -torch.min(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a).mean()
            value_loss = 0.5 * (value - returns[idx]).pow(2).mean()
            entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
            loss = cfg.value_coef * value_loss
            if not value_only:
                loss = loss + policy_loss - cfg.entropy * entropy
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            with torch.no_grad():
                sums["policy_loss"] += policy_loss.item()
                sums["value_loss"] += value_loss.item()
                sums["entropy"] += entropy.item()
                sums["approx_kl"] += (old_logp[idx] - logp).mean().item()
                sums["clip_frac"] += ((ratio - 1).abs() > cfg.clip).float().mean().item()
    model.eval()
    passes = cfg.epochs * cfg.minibatches
    return {k: round(v / passes, 5) for k, v in sums.items()}


def check_run(cfg: FinetuneConfig, run: Path) -> None:
    """ValueError when `run` holds a run of another config (more `updates` extend a run)."""
    cfg_file = Path(run) / "config.json"
    if cfg_file.exists():
        saved = {k: v for k, v in json.loads(cfg_file.read_text()).items() if k != "updates"}
        if saved != {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k != "updates"}:
            raise ValueError(f"{run} holds a fine-tune run with another config; use another directory")


def run_finetune(cfg: FinetuneConfig, run: Path, progress: bool = True,
                 should_stop: Callable[[int], bool] | None = None) -> dict[str, Any]:
    """Runs (or resumes) the fine-tune in `run`; returns the last update's metrics. should_stop(done) is asked after
    each update; True stops there (after a checkpoint), and the result then has "stopped": True."""
    run = Path(run)
    check_run(cfg, run)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    model = ActorCritic(load_reactive_policy(policy_dir(cfg.init)))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=1e-5)
    start, latest = resume_latest(run, model, opt)
    if latest is not None:
        log.info("resuming the fine-tune from %s (update %d)", latest, start)
    model.eval()
    last: dict[str, Any] = {}
    if start < cfg.updates:
        player = Player(make_envs(cfg, start), model.cfg.context)
        for update in range(start, cfg.updates):
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, update, 17]).generate_state(1)[0]))
            t0 = time.monotonic()
            rollout = player.play(model, cfg.rollout, gen)
            t1 = time.monotonic()
            losses = ppo_update(model, opt, rollout, cfg, value_only=update < cfg.value_warmup, gen=gen)
            ended = rollout.episodes
            last = {"update": update + 1, "frames": (update + 1) * cfg.envs * cfg.rollout, "episodes": len(ended),
                    "success": round(float(np.mean([e["success"] for e in ended])), 4) if ended else None,
                    "length": round(float(np.mean([e["length"] for e in ended])), 1) if ended else None,
                    "value_only": update < cfg.value_warmup, **losses,
                    "play_s": round(t1 - t0, 1), "train_s": round(time.monotonic() - t1, 1)}
            with (run / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(last) + "\n")
            if progress:
                log.info("fine-tune update %d: %s", update + 1, last)
            done = update + 1
            stop = should_stop is not None and should_stop(done)
            if done % cfg.checkpoint_every == 0 or done == cfg.updates or stop:
                tensors, groups = optimizer_to_flat(opt)
                save_checkpoint(checkpoint_dir(run, done), "policy", model, done, tensors, {"param_groups": groups})
                prune_checkpoints(run, keep=2)
            if stop and done < cfg.updates:
                return {**last, "stopped": True}
    elif (run / "metrics.jsonl").exists():
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    save_policy(model.policy, run / "policy")
    return last


def load_config(run: Path) -> FinetuneConfig:
    return from_dict(FinetuneConfig, json.loads((Path(run) / "config.json").read_text()))
