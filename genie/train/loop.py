"""One training loop for the three models: AdamW, warmup + cosine, clipping, bf16 option, resumable."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm import tqdm

from genie.config import MODEL_KINDS, TrainConfig, WorldConfig, to_dict
from genie.data import make_source
from genie.data.source import VideoBatch, VideoSource
from genie.train.checkpoint import (
    build_model,
    checkpoint_dir,
    latest_checkpoint,
    load_model,
    optimizer_from_flat,
    optimizer_to_flat,
    prune_checkpoints,
    read_meta,
    remove_partial_checkpoints,
    save_checkpoint,
)

log = logging.getLogger(__name__)
Objective = Callable[[VideoBatch, torch.Generator], tuple[Tensor, dict[str, float]]]


@dataclass
class TrainResult:
    kind: str
    step: int  # last completed step
    resumed_from: int  # 0 when the run started fresh
    checkpoint: Path | None
    logs: dict[str, float]  # the last step's scalars
    seconds: float
    losses: list[float]  # loss of every step run in this call


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _objective(kind: str, model: nn.Module, world: WorldConfig, frozen: dict[str, Path]) -> Objective:
    if kind in ("tokenizer", "lam"):
        return lambda batch, gen: _loss_and_logs(model(batch.frames))
    for need in ("tokenizer", "lam"):
        if need not in frozen or frozen[need] is None:
            raise ValueError(f"training dynamics needs a trained {need} checkpoint (--{need} PATH)")
    tokenizer = load_model(frozen["tokenizer"], "tokenizer").requires_grad_(False)
    lam = load_model(frozen["lam"], "lam").requires_grad_(False)
    d = world.dynamics
    if (tokenizer.cfg.vq.num_codes, tokenizer.cfg.tokens_per_frame) != (d.num_tokens, d.tokens_per_frame):
        raise ValueError(f"tokenizer checkpoint {frozen['tokenizer']} does not match the dynamics config (K, N)")
    if lam.cfg.num_actions != d.num_actions:
        raise ValueError(f"LAM checkpoint {frozen['lam']} has {lam.cfg.num_actions} actions, dynamics expects {d.num_actions}")

    def objective(batch: VideoBatch, gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        with torch.no_grad():
            tokens = tokenizer.encode(batch.frames)  # (B, T, N)
            actions = lam.infer_actions(batch.frames)  # (B, T-1)
        return _loss_and_logs(model(tokens, actions, generator=gen))

    return objective


def _loss_and_logs(out) -> tuple[Tensor, dict[str, float]]:
    return out.loss, {"loss": out.loss.item(), **out.logs}


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(
    kind: str,
    world: WorldConfig,
    run_dir: Path,
    frozen: dict[str, Path] | None = None,
    source: VideoSource | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    tensorboard: bool = True,
    on_step: Callable[[int, dict[str, float]], bool | None] | None = None,
) -> TrainResult:
    """Trains one model of `world`, resuming from the newest checkpoint in `run_dir` if there is one.

    stop_after: stop (with a checkpoint) after this many total steps, as a kill would; used to run in parts.
    frozen: checkpoint dirs of the trained tokenizer and LAM, needed for kind="dynamics".
    on_step: called after every step with (steps done, that step's scalars); returning True stops the run there
        with a checkpoint, as stop_after does. Jobs use it to report progress and to stop on cancel or time limit.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    cfg = world.train_config(kind)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = build_model(kind, world.model_config(kind))
    objective = _objective(kind, model, world, frozen or {})
    source = source or make_source(world.data)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)

    start = 0
    remove_partial_checkpoints(run_dir)
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        start = _resume(latest, kind, model, opt)
        log.info("resuming %s from %s (step %d)", kind, latest, start)
    # Written only once the config is accepted, so a refused resume leaves the run's record untouched.
    tmp = run_dir / ".world.json.tmp"
    tmp.write_text(json.dumps(to_dict(world), indent=2))
    os.replace(tmp, run_dir / "world.json")
    writer = _writer(run_dir, start) if tensorboard else None
    t0, logs, saved, losses = time.perf_counter(), {}, latest, []
    end = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    model.train()
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=f"train {kind}", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = source.batch(step, cfg.batch_size)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
        with autocast:
            loss, logs = objective(batch, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{kind} loss is {loss.item()} at step {step}; last checkpoint kept: {saved}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        logs["grad_norm"] = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
        logs["lr"] = opt.param_groups[0]["lr"]
        opt.step()
        losses.append(logs["loss"])
        done = step + 1
        stop = on_step is not None and bool(on_step(done, logs))
        if stop:
            end = done  # log, checkpoint and report this step as the last one
        if done % cfg.log_every == 0 or done == end:
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if writer is not None:
                for name, value in logs.items():
                    writer.add_scalar(f"{kind}/{name}", value, done)
        if done % cfg.ckpt_every == 0 or done == end:
            saved = _save(run_dir, kind, model, opt, done, cfg)
        if stop:
            break
    bar.close()
    if writer is not None:
        writer.close()
    return TrainResult(kind, end, start, saved, logs, time.perf_counter() - t0, losses)


def _writer(run_dir: Path, start: int):
    from torch.utils.tensorboard import SummaryWriter  # heavy import, only when logging

    return SummaryWriter(str(run_dir / "tb"), purge_step=start or None)


def _save(run_dir: Path, kind: str, model: nn.Module, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> Path:
    tensors, groups = optimizer_to_flat(opt)
    tensors["rng.torch"] = torch.get_rng_state()
    path = save_checkpoint(checkpoint_dir(run_dir, step), kind, model, step, tensors, {"param_groups": groups, "step": step})
    prune_checkpoints(run_dir, cfg.keep_checkpoints)
    return path


def _resume(path: Path, kind: str, model: nn.Module, opt: torch.optim.Optimizer) -> int:
    meta = read_meta(path)
    if meta["kind"] != kind:
        raise ValueError(f"{path} is a {meta['kind']} checkpoint; cannot resume {kind} from it")
    if meta["config"] != to_dict(model.cfg):
        raise ValueError(f"{path} was trained with a different {kind} config; use a new --run-dir or the same config")
    model.load_state_dict(load_file(path / "model.safetensors"))
    tensors = load_file(path / "trainer.safetensors")
    groups = json.loads((path / "trainer.json").read_text())["param_groups"]
    opt.load_state_dict(optimizer_from_flat(tensors, groups))
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])
