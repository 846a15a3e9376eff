"""A world directory: world.json plus the tokenizer, LAM and dynamics checkpoints, loadable as a World."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from genie.config import MODEL_KINDS, WorldConfig, load_world_config, to_dict
from genie.data import make_source
from genie.media import save_png
from genie.sampling import SamplingConfig, World
from genie.state import KVCacheStore
from genie.train.checkpoint import latest_checkpoint, load_model, read_meta


def export_world(run_root: Path, out: Path) -> Path:
    """Copies the newest checkpoint of each model under `run_root/<kind>/` into the world dir `out`."""
    run_root, out = Path(run_root), Path(out)
    world = load_world_config(run_root / "dynamics" / "world.json")
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for kind in MODEL_KINDS:
        ckpt = latest_checkpoint(run_root / kind)
        if ckpt is None:
            raise ValueError(f"no {kind} checkpoint under {run_root / kind}; train it first")
        (tmp / kind).mkdir()
        for name in ("model.safetensors", "config.json"):
            shutil.copy2(ckpt / name, tmp / kind / name)
    (tmp / "world.json").write_text(json.dumps(to_dict(world), indent=2))
    _write_prompts(world, tmp / "prompts")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _write_prompts(world: WorldConfig, folder: Path, count: int = 8) -> None:
    """Saves first frames of held-out clips (training clips if none are held out) as the world's prompts."""
    try:
        source = make_source(world.data, evaluation=True)
    except ValueError:
        source = make_source(world.data)
    folder.mkdir()
    for i, frame in enumerate(source.batch(0, count).frames[:, 0].numpy()):
        save_png(frame, folder / f"{i:02d}.png")


def load_prompts(world_dir: Path) -> list[Path]:
    """The prompt images shipped with a world, in order."""
    return sorted((Path(world_dir) / "prompts").glob("*.png"))


def load_world_config_of(world_dir: Path) -> WorldConfig:
    path = Path(world_dir) / "world.json"
    if not path.exists():
        raise ValueError(f"{world_dir} is not a world directory (no world.json)")
    return load_world_config(path)


def load_world(
    world_dir: Path, sampling: SamplingConfig | None = None, cache: KVCacheStore | None = None
) -> tuple[World, WorldConfig]:
    """Loads the tokenizer and dynamics of a world dir (the LAM is not needed to play)."""
    world_dir = Path(world_dir)
    cfg = load_world_config_of(world_dir)
    for kind in ("tokenizer", "dynamics"):
        read_meta(world_dir / kind)
    tokenizer = load_model(world_dir / "tokenizer", "tokenizer")
    dynamics = load_model(world_dir / "dynamics", "dynamics")
    return World(tokenizer, dynamics, sampling or cfg.sampling, cache=cache), cfg
