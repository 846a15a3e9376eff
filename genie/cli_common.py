"""What every `genie` command module shares: the default world, the one-line failure, the world config from
--preset/--config/--set. The command modules (cli.py, world_cli.py, agent_cli.py) import this, never each other's
helpers, so cli.py can register the others without an import circle."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

# The shipped demo world; GENIE_WORLD overrides it (an installed package has no worlds/ beside it, e.g. in the image).
DEFAULT_WORLD = Path(os.environ.get("GENIE_WORLD") or Path(__file__).resolve().parent.parent / "worlds" / "demo")


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def world_config(preset: str | None, config: Path | None, overrides: tuple[str, ...]):
    from genie.config import apply_overrides, load_world_config
    from genie.presets import get_preset

    if preset and config:
        raise ValueError("give --preset or --config, not both")
    cfg = load_world_config(config) if config else get_preset(preset or "demo")
    return apply_overrides(cfg, list(overrides))
