"""Checkpoints: safetensors weights + a JSON config that rebuilds the model alone. Never pickle.

Layout of one checkpoint directory:
    model.safetensors   the unwrapped module's state_dict
    config.json         {"format", "kind", "config": asdict(model config), "step"}
    trainer.safetensors optimizer tensors and RNG state (training checkpoints only)
    trainer.json        optimizer param groups, scheduler and data position (training checkpoints only)
Directories are written under a temporary name and renamed into place, so a kill never leaves a
half-written checkpoint where `latest_checkpoint` would find it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from genie.config import WorldConfig, from_dict
from genie.diskfull import disk_full_as_error
from genie.models.dynamics import DynamicsModel, DynamicsModelConfig
from genie.models.lam import LatentActionModel, LatentActionModelConfig
from genie.models.tokenizer import VideoTokenizer, VideoTokenizerConfig

CHECKPOINT_FORMAT = 1
MODEL_TYPES: dict[str, tuple[type, type[nn.Module]]] = {
    "tokenizer": (VideoTokenizerConfig, VideoTokenizer),
    "lam": (LatentActionModelConfig, LatentActionModel),
    "dynamics": (DynamicsModelConfig, DynamicsModel),
}
STEP_PREFIX = "step_"


def build_model(kind: str, cfg: Any) -> nn.Module:
    if kind not in MODEL_TYPES:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[kind][1](cfg)


def save_checkpoint(
    directory: Path,
    kind: str,
    model: nn.Module,
    step: int,
    trainer_tensors: dict[str, torch.Tensor] | None = None,
    trainer_meta: dict[str, Any] | None = None,
) -> Path:
    """Atomically writes a checkpoint directory and returns its path."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # A full disk: the partial directory goes at once (it holds the space), the newest complete checkpoint stays.
    with disk_full_as_error(directory, f"{kind} checkpoint (step {step})", cleanup=tmp):
        tmp.mkdir(parents=True)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        meta = {"format": CHECKPOINT_FORMAT, "kind": kind, "config": asdict(model.cfg), "step": step}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        if trainer_tensors is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in trainer_tensors.items()}, tmp / "trainer.safetensors")
            (tmp / "trainer.json").write_text(json.dumps(trainer_meta or {}, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def read_meta(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{directory} is not a Genie checkpoint: {exc}") from exc
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("kind") not in MODEL_TYPES:
        raise ValueError(f"{directory}: unsupported checkpoint format {meta.get('format')!r} / kind {meta.get('kind')!r}")
    return meta


def load_model(directory: Path, expected_kind: str | None = None) -> nn.Module:
    """Rebuilds a model from its checkpoint directory alone (config.json + model.safetensors), in eval mode."""
    meta = read_meta(directory)
    kind = meta["kind"]
    if expected_kind is not None and kind != expected_kind:
        raise ValueError(f"{directory} holds a {kind} checkpoint, expected {expected_kind}")
    cfg = from_dict(MODEL_TYPES[kind][0], meta["config"])
    model = build_model(kind, cfg)
    try:
        model.load_state_dict(load_file(Path(directory) / "model.safetensors"))
    except Exception as exc:  # OSError, RuntimeError (shape mismatch), SafetensorError (corrupt file)
        raise ValueError(f"cannot load weights from {directory}: {exc}") from exc
    return model.eval()


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "config.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def latest_step(run_dir: Path) -> int | None:
    """The step of the newest checkpoint under run_dir; None when there is none yet."""
    latest = latest_checkpoint(run_dir)
    return int(read_meta(latest)["step"]) if latest is not None else None


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{STEP_PREFIX}{step:08d}"


def untrained_frozen(world: WorldConfig, root: Path) -> dict[str, Path]:
    """Step-0 (untrained) tokenizer and LAM checkpoints under root/<kind>: a dynamics run on them costs the same per
    step as one on trained models, so benchmarks and tests of the training loop need not train them first."""
    return {kind: save_checkpoint(checkpoint_dir(root / kind, 0), kind, build_model(kind, world.model_config(kind)), 0)
            for kind in ("tokenizer", "lam")}


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Deletes temporary directories a killed save left behind (they never hold a usable checkpoint)."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resume_latest(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, Path | None]:
    """Loads the newest checkpoint under run_dir (weights and optimizer state, written by save_checkpoint with
    optimizer_to_flat's tensors and {"param_groups": ...}) into model and opt, after removing partial saves; returns
    its step and directory, or (0, None) when there is none."""
    remove_partial_checkpoints(run_dir)
    found = list_checkpoints(run_dir)
    if not found:
        return 0, None
    latest = found[-1]
    model.load_state_dict(load_file(latest / "model.safetensors"))
    opt.load_state_dict(optimizer_from_flat(load_file(latest / "trainer.safetensors"),
                                            json.loads((latest / "trainer.json").read_text())["param_groups"]))
    return int(json.loads((latest / "config.json").read_text())["step"]), latest


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Splits an optimizer state_dict into safetensors-able tensors and JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {f"optim.{idx}.{name}": t for idx, st in sd["state"].items() for name, t in st.items() if torch.is_tensor(t)}
    return tensors, sd["param_groups"]


def optimizer_from_flat(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = t
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}
