"""The library's commands: train models, inspect configs, export, evaluate and build worlds.

The installed `genie` command is `services.cli:main`: this group plus the serving and job commands, which live
beside the services they start, so that nothing in genie/ imports services/."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from genie.cli_common import DEFAULT_WORLD, world_config
from genie.cli_common import fail as _fail


class _Commands(click.Group):
    """The command group; a full disk in any command (DiskFull) ends it with one line and exit code 1, not a
    traceback. What it wrote is already cleaned up where it failed (genie/diskfull.py)."""

    def invoke(self, ctx: click.Context):
        from genie.diskfull import DiskFull

        try:
            return super().invoke(ctx)
        except DiskFull as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Commands)
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """Genie: generative interactive environments."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("kind", type=click.Choice(["tokenizer", "lam", "dynamics"]))
@click.option("--preset", help="Named world config (tiny, demo, peer-small). Default: demo.")
@click.option("--config", "config", type=click.Path(path_type=Path), help="World config JSON (see `genie config`).")
@click.option("--set", "overrides", multiple=True, help="Dotted override, e.g. --set train_tokenizer.steps=500.")
@click.option("--run-root", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Each model trains in RUN_ROOT/KIND; dynamics reads the tokenizer and LAM from there.")
@click.option("--tokenizer", "tokenizer_ckpt", type=click.Path(path_type=Path), help="Tokenizer checkpoint dir.")
@click.option("--lam", "lam_ckpt", type=click.Path(path_type=Path), help="LAM checkpoint dir.")
@click.option("--stop-after", type=int, help="Stop after this many total steps (train in parts; resume later).")
@click.option("--init", "init", type=click.Path(path_type=Path),
              help="Warm start: a new run starts from this checkpoint dir's weights (same model config), with a fresh "
                   "optimizer and schedule; a run that has checkpoints resumes from them instead.")
@click.option("--threads", type=int, default=0, help="torch threads (0 = default).")
@click.option("--device", default="auto", show_default=True,
              help="auto (a GPU when torch sees one, else the CPU), cpu, or cuda (GPU LOCAL_RANK; an error without one).")
@click.option("--data-workers", type=int, help="Processes building the next batches ahead (default: 0 on CPU, on a GPU 2-8).")
@click.option("--tensorboard/--no-tensorboard", default=True, show_default=True,
              help="TensorBoard scalars under RUN_ROOT/KIND/tb.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(kind, preset, config, overrides, run_root, tokenizer_ckpt, lam_ckpt, stop_after, init, threads, device,
          data_workers, tensorboard, quiet) -> None:
    """Train one model; re-running the same command resumes from the newest checkpoint.

    Runs unchanged under `torchrun --nproc-per-node N` (nccl on GPUs, gloo on CPU): DDP, each rank a slice of
    every global batch, only rank 0 writes checkpoints; a checkpoint resumes under any world size and device."""
    import torch

    from genie.train.checkpoint import latest_checkpoint
    from genie.train.loop import train as run_train

    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        # Under torchrun, record() writes an uncaught exception to torchrun's error file, so its failure summary (and
        # a Kubernetes Job's log tail) names the root cause instead of only "child failed".
        from torch.distributed.elastic.multiprocessing.errors import record

        run_train = record(run_train)

    if threads:
        torch.set_num_threads(threads)
    try:
        world = world_config(preset, config, overrides)
        frozen = {}
        if kind == "dynamics":
            frozen = {
                "tokenizer": tokenizer_ckpt or latest_checkpoint(run_root / "tokenizer"),
                "lam": lam_ckpt or latest_checkpoint(run_root / "lam"),
            }
        result = run_train(kind, world, run_root / kind, frozen=frozen, stop_after=stop_after, progress=not quiet,
                           device=device, data_workers=data_workers, tensorboard=tensorboard, init=init)
    except (ValueError, FloatingPointError) as exc:
        _fail(str(exc))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank has the same result: rank 0 reports it
        return
    click.echo(json.dumps({
        "kind": kind, "step": result.step, "resumed_from": result.resumed_from,
        "checkpoint": str(result.checkpoint), "seconds": round(result.seconds, 1),
        "logs": {k: round(v, 5) for k, v in result.logs.items()},
    }))


@main.command("config")
@click.option("--preset", default="demo", show_default=True)
@click.option("--set", "overrides", multiple=True)
def show_config(preset, overrides) -> None:
    """Print a world config as JSON (edit it and pass it back with --config)."""
    from genie.config import to_dict

    try:
        click.echo(json.dumps(to_dict(world_config(preset, None, overrides)), indent=2))
    except ValueError as exc:
        _fail(str(exc))


@main.command("export")
@click.option("--run-root", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="World directory to write.")
def export(run_root, out) -> None:
    """Collect the newest tokenizer, LAM and dynamics checkpoints into a world directory."""
    from genie.worlds import export_world

    try:
        click.echo(str(export_world(run_root, out)))
    except ValueError as exc:
        _fail(str(exc))


@main.group()
def data() -> None:
    """Build training data."""


@data.command("generate")
@click.option("--env", default="coinrun", show_default=True, help="Procgen game.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True)
@click.option("--episodes", type=int, default=100, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="New dataset directory.")
@click.option("--workers", type=int, default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--num-levels", type=int, default=10_000, show_default=True, help="Levels the split draws from.")
@click.option("--max-frames", type=int, default=500, show_default=True, help="Episodes are cut at this length.")
@click.option("--mode", "distribution_mode", type=click.Choice(["easy", "hard"]), default="easy", show_default=True)
@click.option("--policy", type=click.Choice(["sticky", "walk"]), default="sticky", show_default=True,
              help="sticky: any of the game's actions; walk: arrow keys only (walk both ways, stand, jump).")
@click.option("--hold", default="1-4", show_default=True, help="Frames each random action is held: MIN-MAX.")
@click.option("--quiet", is_flag=True)
def data_generate(env, split, episodes, out, workers, seed, num_levels, max_frames, distribution_mode, policy, hold,
                  quiet) -> None:
    """Record episodes of a Procgen game (random sticky policy, true actions kept for evaluation)."""
    from genie.data.procgen import ProcgenConfig, generate

    try:
        lo, sep, hi = hold.partition("-")
        if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
            raise ValueError(f"--hold {hold!r} is not MIN-MAX (e.g. 4-12)")
        cfg = ProcgenConfig(env=env, split=split, episodes=episodes, seed=seed, num_levels=num_levels,
                            max_frames=max_frames, distribution_mode=distribution_mode, policy=policy,
                            hold_min=int(lo), hold_max=int(hi))
        summary = generate(cfg, out, workers=workers, progress=not quiet)
    except (ValueError, ImportError) as exc:
        _fail(str(exc))
    click.echo(json.dumps(summary))


@data.command("import")
@click.argument("videos", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="New dataset directory.")
@click.option("--fps", type=float, default=10.0, show_default=True, help="Output frame rate (never upsampled).")
@click.option("--height", type=int, default=64, show_default=True)
@click.option("--width", type=int, default=64, show_default=True)
@click.option("--static-threshold", type=float, default=2.0, show_default=True,
              help="Mean |pixel difference| (0-255) below which a frame counts as a repeat; 0 = keep all.")
@click.option("--static-frames", type=int, default=10, show_default=True,
              help="Repeats in a row (output frames) that are dropped as a static stretch and end the episode.")
@click.option("--scene-cut", type=float, default=50.0, show_default=True,
              help="Mean |pixel difference| from the previous frame that starts a new episode; 0 = off.")
@click.option("--min-frames", type=int, default=16, show_default=True, help="Shorter episodes are dropped.")
@click.option("--max-frames", type=int, default=500, show_default=True, help="Episodes are cut at this length.")
@click.option("--image-fps", type=float, default=0.0, show_default=True,
              help="Frame rate of image folders (0 = --fps, every image kept).")
@click.option("--quiet", is_flag=True)
def data_import(videos, out, fps, height, width, static_threshold, static_frames, scene_cut, min_frames, max_frames,
                image_fps, quiet) -> None:
    """Import videos (mp4, webm, mkv, gif, ..., folders of numbered images) as a dataset without true actions.

    Unreadable files are reported in the summary and skipped; exits 2 only if nothing could be imported."""
    from genie.data.video import VideoImportConfig, import_videos

    try:
        cfg = VideoImportConfig(fps=fps, height=height, width=width, static_threshold=static_threshold,
                                static_frames=static_frames, scene_cut=scene_cut, min_frames=min_frames,
                                max_frames=max_frames, image_fps=image_fps)
        summary = import_videos(list(videos), out, cfg, progress=not quiet)
    except (ValueError, ImportError) as exc:
        _fail(str(exc))
    click.echo(json.dumps(summary))


@main.command("eval")
@click.option("--world", "world_dir", type=click.Path(path_type=Path), default=DEFAULT_WORLD, show_default=True)
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="Held-out dataset dir (default: the world's data.eval_path, or held-out sprites).")
@click.option("--clips", type=int, default=64, show_default=True)
@click.option("--horizon", type=int, default=4, show_default=True, help="t of the ΔtPSNR (paper: 4).")
@click.option("--sampling-steps", type=int, help="MaskGIT steps (default: the world's).")
@click.option("--drift-steps", type=int, default=0, show_default=True,
              help="Also run sessions this many steps past the prompt (e.g. 64) on held-out clips driven by inferred "
                   "actions and plot PSNR vs step into drift.png (report 'drift'); 0 = off, it is slow.")
@click.option("--drift-clips", type=int, default=16, show_default=True, help="Clips of drift-steps + 1 frames.")
@click.option("--atlas-prompts", type=int, default=4, show_default=True,
              help="Held-out prompts of the action atlas (atlas.png/gif: each latent action from each); 0 = off.")
@click.option("--atlas-steps", type=int, default=8, show_default=True, help="Steps each action is held in the atlas.")
@click.option("--control-levels", type=int, default=16, show_default=True,
              help="Controllability against the real game (data from a Procgen game only): keys calibrated on this "
                   "many validation levels, scored on as many test levels (report 'control'); 0 = off.")
@click.option("--control-horizon", type=int, default=6, show_default=True, help="Frames each key is held there.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("eval"), show_default=True)
def evaluate(world_dir, data_dir, clips, horizon, sampling_steps, drift_steps, drift_clips, atlas_prompts, atlas_steps,
             control_levels, control_horizon, out) -> None:
    """Evaluate a world: reconstruction PSNR/SSIM, ΔtPSNR, action consistency and the latent -> true action
    mapping; writes report.json, compare.gif, atlas.png/gif (and drift.png with --drift-steps). For worlds trained
    on a Procgen game, also whether each arrow key does in the world what it does in the game ('control')."""
    from dataclasses import replace

    from genie.data import make_source
    from genie.eval.run import EvalConfig
    from genie.eval.run import evaluate as run_eval
    from genie.worlds import load_world_config_of

    try:
        wcfg = load_world_config_of(world_dir)
        data_cfg = replace(wcfg.data, source="shards", path=str(data_dir), eval_path=str(data_dir)) if data_dir else wcfg.data
        source = make_source(data_cfg, evaluation=True)
        sampling = replace(wcfg.sampling, steps=sampling_steps) if sampling_steps else None
        ecfg = EvalConfig(clips=clips, horizon=horizon, drift_steps=drift_steps, drift_clips=drift_clips,
                          atlas_prompts=atlas_prompts, atlas_steps=atlas_steps, control_levels=control_levels,
                          control_horizon=control_horizon)
        report = run_eval(world_dir, source, ecfg, out, sampling=sampling)
    except ValueError as exc:
        _fail(str(exc))
    summary = {k: report[k] for k in ("tokenizer", "dynamics", "lam", "drift") if k in report}
    if "mapping" in summary.get("lam", {}):  # the full mapping is in report.json; print its headline numbers
        mapping = summary["lam"]["mapping"]
        summary["lam"] = {**summary["lam"], "mapping": {
            "many_to_one_accuracy": mapping["many_to_one_accuracy"], "one_to_one_accuracy": mapping["one_to_one_accuracy"],
            "majority": [e["majority_name"] for e in mapping["latents"]]}}
    if "atlas" in report:
        summary["atlas"] = {k: report["atlas"][k] for k in ("png", "gif", "mean_psnr_between_actions")}
    if "control" in report:
        from genie.eval.control import control_summary

        summary["control"] = control_summary(report["control"])
    click.echo(json.dumps(summary))


def _add_library_groups() -> None:
    # The world and agent groups live in modules of their own (which import genie.cli_common, not this module).
    from genie.agent_cli import agent
    from genie.world_cli import world

    main.add_command(world)
    main.add_command(agent)


_add_library_groups()

if __name__ == "__main__":
    main()
