"""`genie agent train`: behavioural cloning from expert video, on the frozen LAM's latent actions or (the oracle) on the
true actions, with the latent -> real mapping fitted from k labelled transitions.

A run directory holds:
    config.json            the AgentTrainConfig (a resumed run must match it)
    labels.safetensors     every transition's (episode, t, true action, latent action): the LAM's labels, computed once
    checkpoints/step_N/    policy weights + AdamW state (safetensors + JSON, written atomically)
    policy/                the final policy (config.json + model.safetensors)
    mappings.json          latent -> real action mappings for each k (target "latent" only)
    metrics.jsonl          one JSON line per log interval
Every batch is a function of (seed, step), so a run killed at step s and resumed reaches the same weights.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from genie.agent.policy import (
    ActionMapping,
    Policy,
    PolicyConfig,
    context_frames,
    label_latent_actions,
    random_shift,
)
from genie.config import from_dict
from genie.data.shards import ShardedDataset
from genie.train.checkpoint import (
    checkpoint_dir,
    optimizer_to_flat,
    prune_checkpoints,
    read_meta,
    resume_latest,
    save_checkpoint,
)

log = logging.getLogger(__name__)
TARGETS = ("latent", "true")
POLICY_KIND = "policy"
DEFAULT_LABELLED = (10, 50, 200, 1000)


@dataclass(frozen=True)
class AgentTrainConfig:
    data: str  # expert dataset directory (true actions are read only for target "true" and the k labelled ones)
    world: str = ""  # world directory whose frozen LAM labels the frames (target "latent")
    target: str = "latent"  # "latent": LAM-BC; "true": the oracle, same policy on the true actions
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # num_actions is set from the target
    steps: int = 2000
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 1e-4
    augment: int = 0  # pixels of random shift of the training frames (policy.random_shift; 0: none)
    seed: int = 0
    labelled: tuple[int, ...] = DEFAULT_LABELLED  # k: a mapping is fitted from each many labelled transitions
    val_fraction: float = 0.1  # episodes held out for the logged accuracy
    log_every: int = 100
    checkpoint_every: int = 500
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.target == "latent" and not self.world:
            raise ValueError("target latent needs a world (its LAM labels the frames)")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0 or self.augment < 0:
            raise ValueError(f"need steps >= 1, batch_size >= 1, lr > 0, weight_decay >= 0, augment >= 0; got {self}")
        if not self.labelled or any(k < 1 for k in self.labelled):
            raise ValueError(f"labelled transition counts must be >= 1, got {self.labelled}")
        if not 0 <= self.val_fraction < 1 or self.log_every < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("need 0 <= val_fraction < 1 and log_every, checkpoint_every, keep_checkpoints >= 1")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentTrainConfig:
        data = dict(data)
        policy = from_dict(PolicyConfig, data.pop("policy", {}))
        labelled = tuple(int(k) for k in data.pop("labelled", DEFAULT_LABELLED))
        return cls(**data, policy=policy, labelled=labelled)


@dataclass
class Transitions:
    """The expert data as transitions: episode i's frames and, per transition, its (episode, t) and its labels."""

    frames: list[np.ndarray]  # per episode (F, H, W, C) uint8
    episode: np.ndarray  # (M,) int64
    t: np.ndarray  # (M,) int64: the transition from frame t to t+1
    true: np.ndarray  # (M,) int64 true action (-1 where unknown)
    latent: np.ndarray  # (M,) int64 latent action (-1 where not labelled)

    def inputs(self, rows: np.ndarray, context: int) -> torch.Tensor:
        """The policy inputs of transitions `rows`: (B, context, H, W, C) uint8."""
        return torch.from_numpy(np.stack([context_frames(self.frames[int(self.episode[r])], self.t[r : r + 1], context)[0]
                                          for r in rows]))


def load_transitions(data: Path, lam: torch.nn.Module | None) -> Transitions:
    ds = ShardedDataset(data)
    frames, ep, ts, true, latent = [], [], [], [], []
    for i in range(len(ds.episodes)):
        f, a = ds.episode(i)
        frames.append(np.ascontiguousarray(f))
        ep.append(np.full(len(a), i))
        ts.append(np.arange(len(a)))
        true.append(a)
        latent.append(label_latent_actions(lam, f) if lam is not None else np.full(len(a), -1))
    cat = lambda xs: np.concatenate(xs).astype(np.int64)  # noqa: E731
    return Transitions(frames, cat(ep), cat(ts), cat(true), cat(latent))


def _split(tr: Transitions, cfg: AgentTrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Rows of training and validation transitions (whole episodes held out, the last ones)."""
    episodes = int(tr.episode.max()) + 1
    held = int(round(episodes * cfg.val_fraction)) if episodes > 1 else 0
    cut = episodes - held
    rows = np.arange(len(tr.episode))
    return rows[tr.episode < cut], rows[tr.episode >= cut]


def fit_mappings(tr: Transitions, rows: np.ndarray, labelled: tuple[int, ...], num_latent: int, num_real: int,
                 seed: int) -> dict[int, ActionMapping]:
    """One mapping per k, fitted on the first k of one seeded permutation of `rows` (so the labelled sets nest)."""
    rows = rows[tr.true[rows] >= 0]
    order = np.random.default_rng([seed, 17]).permutation(rows)
    return {k: ActionMapping.fit(tr.latent[order[:k]], tr.true[order[:k]], num_latent, num_real) for k in labelled}


def _targets(tr: Transitions, cfg: AgentTrainConfig) -> np.ndarray:
    return tr.latent if cfg.target == "latent" else tr.true


def _batch_rows(train_rows: np.ndarray, seed: int, step: int, batch: int) -> np.ndarray:
    return train_rows[np.random.default_rng([seed, step]).integers(0, len(train_rows), size=batch)]


@torch.no_grad()
def accuracy(model: Policy, tr: Transitions, rows: np.ndarray, targets: np.ndarray, limit: int = 2048) -> float:
    rows = rows[:limit]
    if len(rows) == 0:
        return float("nan")
    model.eval()
    hits = 0
    for i in range(0, len(rows), 256):
        r = rows[i : i + 256]
        hits += int((model(tr.inputs(r, model.cfg.context)).argmax(-1).numpy() == targets[r]).sum())
    model.train()
    return hits / len(rows)


def _labels_file(run: Path, cfg: AgentTrainConfig) -> Transitions:
    path = run / "labels.safetensors"
    if path.exists():
        tr = load_transitions(Path(cfg.data), None)
        saved = load_file(path)
        if len(saved["latent"]) != len(tr.latent):
            raise ValueError(f"{path} does not match the dataset {cfg.data} (was it regenerated?)")
        tr.latent = saved["latent"].numpy()
        return tr
    from genie.train.checkpoint import load_model

    lam = load_model(Path(cfg.world) / "lam", "lam") if cfg.target == "latent" else None
    tr = load_transitions(Path(cfg.data), lam)
    tensors = {k: torch.from_numpy(getattr(tr, k).copy()) for k in ("episode", "t", "true", "latent")}
    save_file(tensors, run / ".tmp-labels.safetensors")
    (run / ".tmp-labels.safetensors").replace(path)
    return tr


def train_agent(cfg: AgentTrainConfig, run: Path, progress: bool = True, stop_after: int | None = None,
                on_step: Callable[[int, float], bool] | None = None) -> dict[str, Any]:
    """Trains (or resumes) one BC policy in `run`; returns the summary written to run/summary.json, or
    {"run", "step", "finished": False} when it stopped early: at `stop_after`, or when on_step(done, loss) returned
    True (a checkpoint is written first, so the run resumes from there)."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    ds_info = ShardedDataset(Path(cfg.data)).info
    num_real = int(ds_info.get("num_true_actions", 0))
    if num_real < 2:
        raise ValueError(f"{cfg.data} records no true actions (num_true_actions); BC needs an expert recording")
    if cfg.target == "latent":
        num_actions = int(read_meta(Path(cfg.world) / "lam")["config"]["vq"]["num_codes"])
    else:
        num_actions = num_real
    cfg = replace(cfg, policy=replace(cfg.policy, num_actions=num_actions))
    cfg_path = run / "config.json"
    if cfg_path.exists():
        if AgentTrainConfig.from_json(json.loads(cfg_path.read_text())) != cfg:
            raise ValueError(f"{run} holds a run with a different config; choose a new --out or the same options")
    else:
        cfg_path.write_text(json.dumps(asdict(cfg), indent=2))
    tr = _labels_file(run, cfg)
    train_rows, val_rows = _split(tr, cfg)
    targets = _targets(tr, cfg)

    torch.manual_seed(cfg.seed)
    model = Policy(cfg.policy)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, latest = resume_latest(run, model, opt)
    if latest is not None:
        log.info("resuming agent policy from %s (step %d)", latest, start)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    model.train()
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=f"agent {cfg.target}", disable=not progress)
    t0, losses = time.perf_counter(), []
    for step in bar:
        rows = _batch_rows(train_rows, cfg.seed, step, cfg.batch_size)
        inputs = tr.inputs(rows, cfg.policy.context)  # (B, context, H, W, C) uint8
        if cfg.augment:  # the shifts, like the batch, are a function of (seed, step): a resumed run is exact
            inputs = torch.from_numpy(random_shift(inputs.numpy(), cfg.augment, np.random.default_rng([cfg.seed, step, 5])))
        loss = F.cross_entropy(model(inputs), torch.from_numpy(targets[rows]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            row = {"step": done, "loss": float(np.mean(losses)), "val_accuracy": accuracy(model, tr, val_rows, targets),
                   "s_per_step": (time.perf_counter() - t0) / len(losses)}
            losses, t0 = [], time.perf_counter()
            with open(run / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.3f}", val=f"{row['val_accuracy']:.3f}")
        stop = bool(on_step and on_step(done, loss.item())) and done < cfg.steps
        if done % cfg.checkpoint_every == 0 or done == end or stop:
            tensors, groups = optimizer_to_flat(opt)
            save_checkpoint(checkpoint_dir(run, done), POLICY_KIND, model, done, tensors, {"param_groups": groups})
            prune_checkpoints(run, cfg.keep_checkpoints)
        if stop:
            end = done
            break
    bar.close()
    step = start if end <= start else end
    if step < cfg.steps:
        return {"run": str(run), "step": step, "finished": False}
    return _finish(cfg, run, model, tr, train_rows, val_rows, targets, num_real)


def _finish(cfg: AgentTrainConfig, run: Path, model: Policy, tr: Transitions, train_rows: np.ndarray,
            val_rows: np.ndarray, targets: np.ndarray, num_real: int) -> dict[str, Any]:
    save_checkpoint(run / "policy", POLICY_KIND, model, cfg.steps)
    summary: dict[str, Any] = {"run": str(run), "step": cfg.steps, "finished": True, "target": cfg.target,
                               "num_actions": cfg.policy.num_actions, "transitions": int(len(train_rows)),
                               "val_accuracy": accuracy(model.eval(), tr, val_rows, targets)}
    if cfg.target == "latent":
        maps = fit_mappings(tr, train_rows, cfg.labelled, cfg.policy.num_actions, num_real, cfg.seed)
        # How well each mapping turns the LAM's label into the true action on the held-out episodes.
        held = val_rows[tr.true[val_rows] >= 0]
        agree = {k: float((m(tr.latent[held]) == tr.true[held]).mean()) if len(held) else float("nan")
                 for k, m in maps.items()}
        (run / "mappings.json").write_text(json.dumps({
            "num_latent": cfg.policy.num_actions, "num_real": num_real,
            "mappings": {str(k): asdict(m) for k, m in maps.items()}, "val_label_accuracy": {str(k): v for k, v in agree.items()},
        }, indent=2))
        summary["mapping_val_accuracy"] = {str(k): v for k, v in agree.items()}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def load_policy(directory: Path) -> Policy:
    """Rebuilds a policy from its checkpoint directory (config.json + model.safetensors), in eval mode."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{directory} is not a policy checkpoint: {exc}") from exc
    if meta.get("kind") != POLICY_KIND:
        raise ValueError(f"{directory} holds a {meta.get('kind')!r} checkpoint, expected {POLICY_KIND}")
    model = Policy(from_dict(PolicyConfig, meta["config"]))
    model.load_state_dict(load_file(directory / "model.safetensors"))
    return model.eval()


def load_mappings(run: Path) -> dict[int, ActionMapping]:
    """The latent -> real mappings of a LAM-BC run, by k."""
    path = Path(run) / "mappings.json"
    if not path.exists():
        raise ValueError(f"{run} has no mappings.json (is it a finished target-latent run?)")
    data = json.loads(path.read_text())["mappings"]
    return {int(k): ActionMapping(tuple(m["table"]), tuple(tuple(r) for r in m["counts"]), m["labelled"])
            for k, m in data.items()}


def expert_action_counts(run: Path, num_real: int) -> np.ndarray:
    """(R,) how often the expert took each true action in a run's training data (its labels file)."""
    true = load_file(Path(run) / "labels.safetensors")["true"].numpy()
    return np.bincount(true[true >= 0], minlength=num_real)[:num_real]
