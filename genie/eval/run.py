"""`genie eval`: tokenizer reconstruction, LAM action consistency and dynamics controllability of a world.

Also the latent -> true action mapping (where the data records true actions) and the action atlas (what each
latent action does from a few held-out prompts; genie.eval.atlas).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genie.data.source import VideoSource
from genie.eval.atlas import action_atlas
from genie.eval.control import ControlConfig, evaluate_control
from genie.eval.drift import drift
from genie.eval.drift import rollout as _rollout
from genie.eval.metrics import action_consistency, action_mapping, psnr, ssim
from genie.media import write_gif
from genie.models.common import to_uint8
from genie.sampling import SamplingConfig
from genie.train.checkpoint import load_model
from genie.worlds import load_world, names_from_mapping, read_actions_file


@dataclass(frozen=True)
class EvalConfig:
    clips: int = 64  # held-out clips evaluated
    horizon: int = 4  # t of ΔtPSNR: frames generated from one prompt frame (Genie paper: t = 4)
    batch_size: int = 16
    seed: int = 0
    gif_clips: int = 4  # clips shown side by side in the GIF (truth | inferred actions | random actions)
    num_true_actions: int = 0  # 0: taken from the data (max true action + 1)
    drift_steps: int = 0  # long-session drift (drift.png, report["drift"]) over this many steps; 0 = off
    drift_clips: int = 16  # clips of drift_steps + 1 frames (shards: episodes that long)
    atlas_prompts: int = 4  # held-out first frames the action atlas starts from (atlas.png/gif); 0 = off
    atlas_steps: int = 8  # steps each latent action is held in the atlas
    # Controllability against the real game (genie.eval.control), for worlds whose data a Procgen game recorded:
    # keys are calibrated on `control_levels` validation levels and scored on as many test levels; 0 = off.
    control_levels: int = 16
    control_horizon: int = 6

    def __post_init__(self) -> None:
        if self.clips < 1 or self.batch_size < 1 or self.horizon < 1 or self.gif_clips < 0:
            raise ValueError("clips, batch_size and horizon must be >= 1, gif_clips >= 0")
        if self.drift_steps < 0 or self.drift_clips < 1:
            raise ValueError(f"drift_steps must be >= 0 and drift_clips >= 1, got {self.drift_steps}, {self.drift_clips}")
        if self.atlas_prompts < 0 or self.atlas_steps < 1:
            raise ValueError(f"atlas_prompts must be >= 0, atlas_steps >= 1, got {self.atlas_prompts}, {self.atlas_steps}")
        if self.control_levels < 0 or self.control_horizon < 1:
            raise ValueError(f"control_levels must be >= 0 and control_horizon >= 1, got {self.control_levels}, "
                             f"{self.control_horizon}")


@torch.no_grad()
def evaluate(
    world_dir: Path, source: VideoSource, cfg: EvalConfig, out_dir: Path, sampling: SamplingConfig | None = None,
    precision: str = "auto", control_keys: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """Evaluates a world directory on held-out clips; writes report.json, compare.gif and atlas.png/gif into `out_dir`.

    sampling/precision: the step's settings (default: the world's sampling, fp32 on a CPU). control_keys: score the
    controllability eval with these key bindings on the test levels only (a speed setting judged by the reference's
    bindings); None calibrates them on validation levels first.

    report["lam"]["mapping"] (with true actions) is genie.eval.metrics.action_mapping; report["atlas"] holds the
    atlas files and per-action numbers (genie.eval.atlas.action_atlas).
    """
    world, wcfg = load_world(world_dir, sampling=sampling, precision=precision)
    lam = load_model(Path(world_dir) / "lam", "lam")
    tokenizer = world.tokenizer
    if cfg.horizon >= wcfg.data.frames:
        raise ValueError(f"horizon {cfg.horizon} needs clips longer than {wcfg.data.frames} frames")
    rng = torch.Generator().manual_seed(cfg.seed)
    rec_psnr, rec_ssim, used = [], [], set()
    latent_all, true_all = [], []
    inf_psnr, rnd_psnr, inf_ssim = [], [], []
    gif_rows: list[np.ndarray] = []
    atlas_prompts: list[torch.Tensor] = []  # first frames of held-out clips, each (H, W, C)
    done, step = 0, 0
    while done < cfg.clips:
        batch = source.batch(step, min(cfg.batch_size, cfg.clips - done))
        step += 1
        frames = batch.frames  # (B, T, H, W, C) uint8
        b = frames.shape[0]
        tokens = tokenizer.encode(frames)
        recon = to_uint8(tokenizer.decode(tokens))
        rec_psnr.append(psnr(recon, frames).flatten())
        rec_ssim.append(ssim(recon, frames).flatten())
        used.update(tokens.unique().tolist())
        latent = lam.infer_actions(frames)  # (B, T-1)
        if batch.actions is not None:
            latent_all.append(latent.flatten().numpy())
            true_all.append(batch.actions.flatten().numpy())
        h = cfg.horizon
        seeds = [cfg.seed * 100_003 + done + i for i in range(b)]
        random_actions = torch.randint(0, world.num_actions, (b, h), generator=rng)
        gen_inf = _rollout(world, frames[:, :1], latent[:, :h], seeds)  # (B, h, H, W, C)
        gen_rnd = _rollout(world, frames[:, :1], random_actions, seeds)
        truth = frames[:, 1 : h + 1]
        inf_psnr.append(psnr(gen_inf, truth))  # (B, h)
        rnd_psnr.append(psnr(gen_rnd, truth))
        inf_ssim.append(ssim(gen_inf, truth))
        for i in range(min(b, cfg.gif_clips - len(gif_rows))):
            gif_rows.append(_side_by_side(frames[i, : h + 1], gen_inf[i], gen_rnd[i]))
        atlas_prompts.extend(frames[: cfg.atlas_prompts - len(atlas_prompts), 0])
        done += b
    inf, rnd = torch.cat(inf_psnr), torch.cat(rnd_psnr)  # (M, h)
    report: dict[str, Any] = {
        "world": str(world_dir),
        "eval": asdict(cfg),
        "sampling": asdict(world.sampling),
        "clips": done,
        "tokenizer": {
            "psnr": float(torch.cat(rec_psnr).mean()),
            "ssim": float(torch.cat(rec_ssim).mean()),
            "codebook_usage": len(used) / tokenizer.cfg.vq.num_codes,
        },
        "dynamics": {
            "psnr_by_step_inferred": inf.mean(0).tolist(),
            "psnr_by_step_random": rnd.mean(0).tolist(),
            "ssim_by_step_inferred": torch.cat(inf_ssim).mean(0).tolist(),
            f"psnr_t{cfg.horizon}_inferred": float(inf[:, -1].mean()),
            f"psnr_t{cfg.horizon}_random": float(rnd[:, -1].mean()),
            f"delta_psnr_t{cfg.horizon}": float(inf[:, -1].mean() - rnd[:, -1].mean()),
            "next_frame_psnr_inferred": float(inf[:, 0].mean()),
        },
    }
    if latent_all:
        latent_np, true_np = np.concatenate(latent_all), np.concatenate(true_all)
        known = true_np >= 0  # -1: no true action recorded for that transition
        latent_np, true_np = latent_np[known], true_np[known]
    if latent_all and true_np.size:
        num_true = cfg.num_true_actions or int(true_np.max()) + 1
        report["lam"] = action_consistency(latent_np, true_np, world.num_actions, num_true)
        true_names = getattr(source, "true_action_names", None)  # recorded by datasets; sprites have fixed ones
        report["lam"]["mapping"] = action_mapping(
            latent_np, true_np, world.num_actions, max(num_true, len(true_names or [])), true_names
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if gif_rows:
        write_gif(np.concatenate(gif_rows, axis=1), out_dir / "compare.gif", fps=4, scale=3)
        report["gif"] = str(out_dir / "compare.gif")
    if atlas_prompts:
        names = _atlas_names(Path(world_dir), report, world.num_actions)
        report["atlas"] = action_atlas(
            world, torch.stack(atlas_prompts), cfg.atlas_steps, names, out_dir, seed=cfg.seed, batch_size=64
        )
    if cfg.drift_steps:
        report["drift"] = drift(world, lam, source, cfg.drift_steps, cfg.drift_clips, cfg.seed, cfg.batch_size, out_dir)
    game = procgen_game_of(source)
    if cfg.control_levels and game is not None:
        report["control"] = controllability(world, lam, game, cfg.control_levels, cfg.control_horizon, cfg.seed,
                                            keys=control_keys)
    (out_dir / "report.json").write_text(json.dumps(_finite(report), indent=2))
    return report


def procgen_game_of(source: VideoSource) -> tuple[str, str] | None:
    """(env, distribution mode) of the Procgen game that recorded a dataset source; None for other sources
    (imported videos, sprites), which have no simulator to check a world against."""
    info = getattr(getattr(source, "data", None), "info", None) or {}
    if info.get("source") != "procgen":
        return None
    game = info.get("config") or {}
    return str(game.get("env", "coinrun")), str(game.get("distribution_mode", "easy"))


def controllability(world, lam, game: tuple[str, str], levels: int, horizon: int, seed: int = 0,
                    keys: dict[str, int | None] | None = None) -> dict[str, Any]:
    """Keys calibrated against the real game on validation levels, then scored on test levels with those bindings
    (genie.eval.control): report["control"] = {"keys": the bindings, "calibration": ..., "test": ...}. With `keys`
    given, no calibration: the test levels are scored with those bindings ("calibration": None)."""
    env, mode = game
    calib = ControlConfig(env=env, split="val", levels=levels, seed=seed, distribution_mode=mode, horizon=horizon)
    if keys is not None:
        test = evaluate_control(world, lam, replace(calib, split="test"), keys=keys)
        return {"keys": dict(keys), "calibration": None, "test": test}
    calibration = evaluate_control(world, lam, calib)
    keys = {**calibration["calibrated_keys"], "noop": calibration["keys_scored"]["noop"]}
    test = evaluate_control(world, lam, replace(calib, split="test"), keys=keys)
    return {"keys": calibration["calibrated_keys"], "calibration": calibration, "test": test}


def _atlas_names(world_dir: Path, report: dict[str, Any], num_actions: int) -> list[str]:
    """The names the atlas shows: a user's edits in actions.json, else what this report's mapping derives."""
    try:
        doc = read_actions_file(world_dir)
    except ValueError:
        doc = None  # a broken names file must not stop the eval; `genie world names` reports it
    if doc is not None and doc["source"] == "user" and len(doc["names"]) == num_actions:
        return list(doc["names"])
    return names_from_mapping((report.get("lam") or {}).get("mapping"), num_actions)


def _side_by_side(truth: torch.Tensor, inferred: torch.Tensor, random: torch.Tensor) -> np.ndarray:
    """(h+1, H, W, C) truth and (h, H, W, C) generations -> (h+1, H, 3W + 2, C): the prompt repeated at t=0."""
    first = truth[:1]
    cols = [truth, torch.cat([first, inferred]), torch.cat([first, random])]
    sep = torch.full((truth.shape[0], truth.shape[1], 1, truth.shape[3]), 255, dtype=torch.uint8)
    return torch.cat([cols[0], sep, cols[1], sep, cols[2]], dim=2).numpy()


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: report them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
