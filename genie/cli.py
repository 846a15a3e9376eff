"""The `genie` command: train models, inspect configs, export worlds and play them."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

DEFAULT_WORLD = Path(__file__).resolve().parent.parent / "worlds" / "demo"


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _world_config(preset: str | None, config: Path | None, overrides: tuple[str, ...]):
    from genie.config import apply_overrides, load_world_config
    from genie.presets import get_preset

    if preset and config:
        raise ValueError("give --preset or --config, not both")
    cfg = load_world_config(config) if config else get_preset(preset or "demo")
    return apply_overrides(cfg, list(overrides))


@click.group()
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
@click.option("--threads", type=int, default=0, help="torch threads (0 = default).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(kind, preset, config, overrides, run_root, tokenizer_ckpt, lam_ckpt, stop_after, threads, quiet) -> None:
    """Train one model; re-running the same command resumes from the newest checkpoint."""
    import torch

    from genie.train.checkpoint import latest_checkpoint
    from genie.train.loop import train as run_train

    if threads:
        torch.set_num_threads(threads)
    try:
        world = _world_config(preset, config, overrides)
        frozen = {}
        if kind == "dynamics":
            frozen = {
                "tokenizer": tokenizer_ckpt or latest_checkpoint(run_root / "tokenizer"),
                "lam": lam_ckpt or latest_checkpoint(run_root / "lam"),
            }
        result = run_train(kind, world, run_root / kind, frozen=frozen, stop_after=stop_after, progress=not quiet)
    except (ValueError, FloatingPointError) as exc:
        _fail(str(exc))
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
        click.echo(json.dumps(to_dict(_world_config(preset, None, overrides)), indent=2))
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


@main.command()
@click.option("--world", "world_dir", type=click.Path(path_type=Path), default=DEFAULT_WORLD, show_default=True)
@click.option("--steps", type=int, default=32, show_default=True, help="Frames to generate.")
@click.option("--actions", default="random", show_default=True, help="Comma-separated latent actions, or 'random'.")
@click.option("--prompt", default="0", show_default=True,
              help="A PNG/JPEG file, or the index of one of the world's prompts (WORLD/prompts/).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sampling-steps", type=int, help="MaskGIT steps (default: the world's).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("play.gif"), show_default=True)
def play(world_dir, steps, actions, prompt, seed, sampling_steps, out) -> None:
    """Play a world with a scripted action sequence and write a GIF (the interactive server comes with the
    gateway; this drives the same World.step it will call)."""
    from dataclasses import replace

    import numpy as np
    import torch

    from genie.media import load_image, write_gif
    from genie.state import KVCacheStore
    from genie.worlds import load_prompts, load_world

    try:
        world, cfg = load_world(world_dir, cache=KVCacheStore())
        if sampling_steps:
            world.sampling = replace(world.sampling, steps=sampling_steps)
        if actions == "random":
            seq = torch.randint(0, world.num_actions, (steps,), generator=torch.Generator().manual_seed(seed)).tolist()
        else:
            try:
                seq = [int(a) for a in actions.split(",")]
            except ValueError:
                raise ValueError(f"--actions must be comma-separated integers or 'random', got {actions!r}") from None
        image = _prompt_path(prompt, load_prompts(world_dir))
        frame = load_image(image, cfg.data.height, cfg.data.width)
        states, first = world.reset(torch.from_numpy(frame)[None, None], [seed])
        frames = [first[0].numpy()]
        t0 = time.perf_counter()
        for a in seq:
            states, out_frame = world.step(states, [a])
            frames.append(out_frame[0].numpy())
        elapsed = time.perf_counter() - t0
    except ValueError as exc:
        _fail(str(exc))
    write_gif(np.stack(frames), out)
    click.echo(json.dumps({"gif": str(out), "frames": len(seq), "fps": round(len(seq) / elapsed, 2), "actions": seq}))


def _prompt_path(prompt: str, shipped: list[Path]) -> Path:
    if prompt.isdigit():
        if int(prompt) >= len(shipped):
            raise ValueError(f"the world ships {len(shipped)} prompts; --prompt {prompt} is out of range")
        return shipped[int(prompt)]
    path = Path(prompt)
    if not path.is_file():
        raise ValueError(f"prompt image {path} does not exist")
    return path


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
@click.option("--quiet", is_flag=True)
def data_generate(env, split, episodes, out, workers, seed, num_levels, max_frames, distribution_mode, quiet) -> None:
    """Record episodes of a Procgen game (random sticky policy, true actions kept for evaluation)."""
    from genie.data.procgen import ProcgenConfig, generate

    try:
        cfg = ProcgenConfig(env=env, split=split, episodes=episodes, seed=seed, num_levels=num_levels,
                            max_frames=max_frames, distribution_mode=distribution_mode)
        summary = generate(cfg, out, workers=workers, progress=not quiet)
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
@click.option("--out", type=click.Path(path_type=Path), default=Path("eval"), show_default=True)
def evaluate(world_dir, data_dir, clips, horizon, sampling_steps, out) -> None:
    """Evaluate a world: reconstruction PSNR/SSIM, ΔtPSNR, action consistency; writes report.json + compare.gif."""
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
        report = run_eval(world_dir, source, EvalConfig(clips=clips, horizon=horizon), out, sampling=sampling)
    except ValueError as exc:
        _fail(str(exc))
    click.echo(json.dumps({k: report[k] for k in ("tokenizer", "dynamics", "lam") if k in report}))


if __name__ == "__main__":
    main()
