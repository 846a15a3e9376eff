"""One training loop for the three models: AdamW, warmup + cosine, clipping, bf16 option, resumable."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from genie.config import MODEL_KINDS, TrainConfig, WorldConfig, to_dict
from genie.data import make_source
from genie.data.source import VideoBatch, VideoSource
from genie.device import cpu_has_bf16
from genie.diskfull import disk_full_as_error
from genie.models.dynamics import DynamicsModelConfig
from genie.nn.maskgit import random_frame_mask
from genie.nn.vq import full_precision
from genie.train import batches, distributed
from genie.train.checkpoint import (
    STEP_PREFIX,
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
from genie.train.token_cache import TokenBatch, TokenCache, build_token_cache

log = logging.getLogger(__name__)
# DDP need not broadcast buffers (the VQ idle counters are equal on every rank): torch 2.13 names the switch
# forward_sync_buffers and deprecates broadcast_buffers, which older releases (2.11 on the GPU image) still need.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})
# (batch, the step's generator, which rows of the global batch `batch` is: None = all) -> (loss, scalars)
Objective = Callable[[VideoBatch, torch.Generator, "slice | None"], tuple[Tensor, dict[str, float]]]


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


def _objective(kind: str, model: nn.Module, world: WorldConfig, frozen: tuple[nn.Module, nn.Module] | None) -> Objective:
    if kind in ("tokenizer", "lam"):
        return lambda batch, gen, rows=None: _loss_and_logs(model(batch.frames))  # per-element means: parts add up
    tokenizer, lam = frozen
    return _dynamics_objective(model, tokenizer, lam, world.dynamics, world.train_dynamics.batch_size)


def _cached_tokens(world: WorldConfig, frozen_dirs: dict[str, Path], frozen: tuple[nn.Module, nn.Module],
                   run_dir: Path, topo: distributed.Topology, progress: bool) -> TokenCache:
    """The dynamics run's token cache (run_dir/token-cache): rank 0 builds or resumes it, the others then load it."""
    out = run_dir / "token-cache"
    build = lambda: build_token_cache(out, Path(world.data.path), world.data.frames,  # noqa: E731
                                      Path(frozen_dirs["tokenizer"]), Path(frozen_dirs["lam"]), *frozen, topo.device,
                                      seed=world.data.seed, progress=progress and topo.leader)
    cache = build() if topo.leader else None
    distributed.barrier(topo)
    return cache if cache is not None else build()


def _frozen_models(world: WorldConfig, frozen: dict[str, Path], device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The trained tokenizer and LAM a dynamics run encodes its batches with, checked against its config."""
    for need in ("tokenizer", "lam"):
        if need not in frozen or frozen[need] is None:
            raise ValueError(f"training dynamics needs a trained {need} checkpoint (--{need} PATH)")
    tokenizer = load_model(frozen["tokenizer"], "tokenizer").requires_grad_(False).to(device)
    lam = load_model(frozen["lam"], "lam").requires_grad_(False).to(device)
    d = world.dynamics
    if (tokenizer.cfg.vq.num_codes, tokenizer.cfg.tokens_per_frame) != (d.num_tokens, d.tokens_per_frame):
        raise ValueError(f"tokenizer checkpoint {frozen['tokenizer']} does not match the dynamics config (K, N)")
    if lam.cfg.num_actions != d.num_actions:
        raise ValueError(f"LAM checkpoint {frozen['lam']} has {lam.cfg.num_actions} actions, dynamics expects {d.num_actions}")
    return tokenizer, lam


def _dynamics_objective(model: nn.Module, tokenizer: nn.Module, lam: nn.Module, d: DynamicsModelConfig,
                        total: int) -> Objective:
    """Tokens and latent actions from the frozen models, then the MaskGIT loss; `total` is the global batch."""

    def objective(batch: VideoBatch | TokenBatch, gen: torch.Generator, rows: slice | None = None
                  ) -> tuple[Tensor, dict[str, float]]:
        replay = gen.get_state()
        if isinstance(batch, TokenBatch):  # encoded once, ahead of training (train_dynamics.encode_once)
            tokens, actions = batch.tokens, batch.actions
        else:
            # The frozen models encode in fp32 even under bf16 autocast: the tokens and actions a world is trained
            # on are the ones its tokenizer and LAM give at inference.
            with torch.no_grad(), full_precision(batch.frames.device):
                tokens = tokenizer.encode(batch.frames)  # (B, T, N)
                actions = lam.infer_actions(batch.frames)  # (B, T-1)
        loss, logs = _loss_and_logs(model(tokens, actions, generator=gen))
        if rows is None:
            return loss, logs
        # The CE is a mean over masked tokens and parts of a batch mask different numbers of them: weigh this
        # part by its share of the batch's masked tokens, so averaging over parts gives the whole batch's CE.
        share = _masked_share(d, replay, rows, total, tokens.shape[1:])
        loss = loss * (share * total / (rows.stop - rows.start))
        logs["loss"] = logs["ce"] = loss.item()
        return loss, logs

    return objective


def _masked_share(d: DynamicsModelConfig, replay: torch.Tensor, rows: slice, total: int, tn: tuple[int, int]) -> float:
    """The fraction of the global batch's masked tokens in `rows`, by replaying DynamicsModel.forward's draws
    (action dropout, then the frame mask) for all `total` rows from the step generator's state `replay`."""
    gen = torch.Generator().set_state(replay)
    t, n = tn
    if d.action_dropout > 0:
        torch.rand(total, t, generator=gen)
    counts = random_frame_mask((total, t, n), d.mask_min, d.mask_max, gen).sum((1, 2))  # (total,)
    return float(counts[rows].sum() / counts.sum())


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
    device: str = "auto",
    data_workers: int | None = None,
    init: Path | None = None,
) -> TrainResult:
    """Trains one model of `world`, resuming from the newest checkpoint in `run_dir` if there is one.

    stop_after: stop (with a checkpoint) after this many total steps, as a kill would; used to run in parts.
    frozen: checkpoint dirs of the trained tokenizer and LAM, needed for kind="dynamics".
    on_step: called after every step with (steps done, that step's scalars); returning True stops the run there
        with a checkpoint, as stop_after does. Jobs use it to report progress and to stop on cancel or time limit.
    device: "auto" (a GPU when torch sees one, else the CPU), "cpu" or "cuda" (cuda:LOCAL_RANK).
    init: a checkpoint dir (config.json + model.safetensors, e.g. a world's dynamics/) whose weights a new run starts
        from (a warm start: fresh optimizer, the schedule of `world` from step 0); ignored once `run_dir` has a
        checkpoint, so a warm-started run resumes like any other. Its model config must equal this run's.
    data_workers: processes that build the next batches while a step runs (genie.train.batches; None = 0 on the
        CPU, and on a GPU half the node's CPUs per local rank, 2 to 8). The scalar `data_s` is the time a step waited for its batch.

    Under torchrun (WORLD_SIZE > 1) each process trains its rows of every global batch with DDP (nccl on GPUs,
    gloo on CPUs), see genie.train.distributed; rank 0 alone writes checkpoints, world.json, TensorBoard and the
    progress bar. cfg.batch_size is the global batch whatever the world size, so a checkpoint resumes under any
    world size, and on either device: checkpoints hold CPU tensors, and per-sample randomness (masks, action
    dropout) is drawn on the CPU from a (seed, step) generator, so a GPU run sees the same masks as a CPU run.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    cfg = world.train_config(kind)
    topo = distributed.topology()
    topo = replace(topo, device=distributed.resolve_device(device, topo))
    micro = distributed.check_batch(cfg.batch_size, topo.world, cfg.grad_accum)
    workers = batches.resolve_workers(data_workers, topo.device)
    owns_group = distributed.init(topo)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if topo.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    try:
        return _train(kind, world, cfg, topo, micro, workers, Path(run_dir), frozen, source, stop_after, progress,
                      tensorboard, on_step, init)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        if owns_group:
            distributed.shutdown()


def _train(
    kind: str,
    world: WorldConfig,
    cfg: TrainConfig,
    topo: distributed.Topology,
    micro: int,
    workers: int,
    run_dir: Path,
    frozen: dict[str, Path] | None,
    source: VideoSource | None,
    stop_after: int | None,
    progress: bool,
    tensorboard: bool,
    on_step: Callable[[int, dict[str, float]], bool | None] | None,
    init: Path | None = None,
) -> TrainResult:
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = build_model(kind, world.model_config(kind)).to(topo.device)  # built on the CPU: same init on any device
    # The objective calls the DDP wrapper (its forward arms the gradient all-reduce); checkpoints hold `model`.
    trained = model
    if topo.distributed:
        ids = [topo.device.index] if topo.device.type == "cuda" else None
        trained = DistributedDataParallel(model, device_ids=ids, **_NO_BUFFER_SYNC)
    frozen_models = _frozen_models(world, frozen or {}, topo.device) if kind == "dynamics" else None
    objective = _objective(kind, trained, world, frozen_models)
    if kind == "dynamics" and cfg.encode_once:
        if world.data.source != "shards":
            raise ValueError("train_dynamics.encode_once needs data.source=shards: it encodes a dataset's episodes")
        if source is not None:
            raise ValueError("train_dynamics.encode_once encodes the config's dataset: pass no other source")
        source = _cached_tokens(world, frozen or {}, frozen_models, run_dir, topo, progress)
    source = source or make_source(world.data)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)

    start = 0
    if topo.leader:
        remove_partial_checkpoints(run_dir)
    latest = latest_checkpoint(run_dir) if topo.leader else None
    # Every rank resumes from the checkpoint rank 0 found (run_dir is shared).
    latest_step = distributed.broadcast_int(-1 if latest is None else int(latest.name[len(STEP_PREFIX) :]), topo)
    latest = None if latest_step < 0 else checkpoint_dir(run_dir, latest_step)
    if latest is not None:
        start = _resume(latest, kind, model, opt, topo.device)
        log.info("resuming %s from %s (step %d)", kind, latest, start)
    elif init is not None:
        _warm_start(Path(init), kind, model)
        log.info("warm start of %s from the weights in %s", kind, init)
    if topo.leader:  # written only once the config is accepted, so a refused resume leaves the record untouched
        tmp = run_dir / ".world.json.tmp"
        with disk_full_as_error(run_dir / "world.json", "run's world.json", cleanup=tmp):
            tmp.write_text(json.dumps(to_dict(world), indent=2))
            os.replace(tmp, run_dir / "world.json")
    # One process without accumulation runs exactly the original step; otherwise a step is split into rows.
    split = topo.distributed or cfg.grad_accum > 1
    resets = distributed.install_code_resets(model, topo) if split else []
    writer = _writer(run_dir, start) if tensorboard and topo.leader else None
    t0, logs, saved, losses = time.perf_counter(), {}, latest, []
    end = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    model.train()
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=f"train {kind}", disable=not (progress and topo.leader))
    # This rank's micro-batches of every step from `start` on: rows [first, first + micro * accum) of each global batch.
    items = batches.StepBatches(source, start, end, cfg.batch_size, topo.rank * micro * cfg.grad_accum, micro,
                                cfg.grad_accum)
    parts = batches.stream(items, workers, topo.device)
    try:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            waited = time.perf_counter()
            step_batches = [_to(next(parts), topo.device) for _ in range(cfg.grad_accum)]
            waited = time.perf_counter() - waited
            if split:
                logs = _split_step(trained, objective, step_batches, step, cfg, topo, micro, resets)
                loss = torch.tensor(logs["loss"])
            else:
                with _autocast(cfg, topo.device):
                    loss, logs = objective(step_batches[0], _step_generator(cfg, step))
                loss.backward()
            logs["data_s"] = waited  # this rank's wait for its batches (rank 0's is logged)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{kind} loss is {loss.item()} at step {step}; last checkpoint kept: {saved}")
            logs["grad_norm"] = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
            logs["lr"] = opt.param_groups[0]["lr"]
            opt.step()
            losses.append(logs["loss"])
            done = step + 1
            stop = on_step is not None and bool(on_step(done, logs))
            stop = bool(distributed.broadcast_int(int(stop), topo)) if on_step is not None else stop
            if stop:
                end = done  # log, checkpoint and report this step as the last one
            if done % cfg.log_every == 0 or done == end:
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
                if writer is not None:
                    for name, value in logs.items():
                        writer.add_scalar(f"{kind}/{name}", value, done)
            if done % cfg.ckpt_every == 0 or done == end:
                if topo.leader:
                    _save(run_dir, kind, model, opt, done, cfg, topo.device)
                distributed.barrier(topo)  # no rank runs ahead of a checkpoint it may have to resume from
                saved = checkpoint_dir(run_dir, done)
            if stop:
                break
    finally:
        parts.close()  # stops the data workers, also when the run stops early or fails
        bar.close()
        if writer is not None:
            writer.close()
        distributed.remove_code_resets(model)
    return TrainResult(kind, end, start, saved, logs, time.perf_counter() - t0, losses)


def _autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast where cfg.bf16 asks for it and the hardware has it: a CPU without bf16 units (AVX2 only) would
    emulate it at ~1 GFLOP/s, so there bf16 means fp32 (a run resumed on such a machine goes on in fp32)."""
    if not cfg.bf16 or (device.type == "cpu" and not cpu_has_bf16()):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _to(batch: VideoBatch, device: torch.device) -> VideoBatch:
    if device.type == "cpu":
        return batch
    return batch.apply(lambda t: t.to(device, non_blocking=True))


def _step_generator(cfg: TrainConfig, step: int) -> torch.Generator:
    """The generator of a step's per-sample randomness (masks, dropout): a function of (seed, step) alone."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)


def _split_step(
    trained: nn.Module,
    objective: Objective,
    step_batches: list[VideoBatch],
    step: int,
    cfg: TrainConfig,
    topo: distributed.Topology,
    micro: int,
    resets: list[distributed.GlobalCodeReset],
) -> dict[str, float]:
    """Forward + backward of this rank's rows of the global batch, one micro-batch of `micro` rows at a time; DDP
    averages the gradients over ranks on the last micro-batch. Returns the scalars averaged over the global batch."""
    first = topo.rank * micro * cfg.grad_accum
    logs = []
    for m, batch in enumerate(step_batches):
        last = m == cfg.grad_accum - 1
        rows = slice(first + m * micro, first + (m + 1) * micro)
        gen = _step_generator(cfg, step)  # every micro-batch replays the step's draws and keeps its rows
        for r in resets:
            r.last_micro = last
        sync = contextlib.nullcontext() if last or not isinstance(trained, DistributedDataParallel) else trained.no_sync()
        with sync:
            with _autocast(cfg, topo.device), distributed.SlicedDraws(gen, rows, cfg.batch_size):
                loss, micro_logs = objective(batch, gen, rows)
            (loss / cfg.grad_accum).backward()
        logs.append(micro_logs)
    return distributed.mean_logs(logs, topo)


def _writer(run_dir: Path, start: int):
    from torch.utils.tensorboard import SummaryWriter  # heavy import, only when logging

    return SummaryWriter(str(run_dir / "tb"), purge_step=start or None)


def _save(run_dir: Path, kind: str, model: nn.Module, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig,
          device: torch.device) -> Path:
    tensors, groups = optimizer_to_flat(opt)
    tensors["rng.torch"] = torch.get_rng_state()
    if device.type == "cuda":  # the global CUDA generator draws dropout (STTransformerConfig.dropout) on a GPU
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    path = save_checkpoint(checkpoint_dir(run_dir, step), kind, model, step, tensors, {"param_groups": groups, "step": step})
    prune_checkpoints(run_dir, cfg.keep_checkpoints)
    return path


def _warm_start(path: Path, kind: str, model: nn.Module) -> None:
    """Loads the weights of another run's checkpoint (same kind and model config) into a new run's model."""
    meta = read_meta(path)
    if meta["kind"] != kind:
        raise ValueError(f"{path} is a {meta['kind']} checkpoint; cannot warm-start {kind} from it")
    saved, now = meta["config"], to_dict(model.cfg)
    free = getattr(type(model.cfg), "objective_fields", ())  # training-objective fields: the weights are the same

    def weights_part(config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in free}

    if weights_part(saved) != weights_part(now):
        raise ValueError(f"{path} has a different {kind} config than this run; a warm start needs the same model")
    changed = {k: (saved.get(k), now[k]) for k in free if k in now and saved.get(k) != now[k]}
    if changed:
        log.info("warm start of %s with a changed training objective (was, now): %s", kind, changed)
    try:
        model.load_state_dict(load_file(path / "model.safetensors"))
    except Exception as exc:  # OSError, SafetensorError (corrupt file)
        raise ValueError(f"cannot load weights from {path}: {exc}") from exc


def _resume(path: Path, kind: str, model: nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> int:
    meta = read_meta(path)
    if meta["kind"] != kind:
        raise ValueError(f"{path} is a {meta['kind']} checkpoint; cannot resume {kind} from it")
    if meta["config"] != to_dict(model.cfg):
        raise ValueError(f"{path} was trained with a different {kind} config; use a new --run-dir or the same config")
    model.load_state_dict(load_file(path / "model.safetensors"))
    tensors = load_file(path / "trainer.safetensors")
    groups = json.loads((path / "trainer.json").read_text())["param_groups"]
    opt.load_state_dict(optimizer_from_flat(tensors, groups))  # moves the moments onto the parameters' device
    torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in tensors:  # a CPU checkpoint resumed on a GPU keeps its seed's state
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    return int(meta["step"])
