"""`genie world ...`: build a playable world from videos in one command, and name its latent actions."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("world")
def world() -> None:
    """Build worlds and edit their action names and arrow key bindings."""


@world.command("build")
@click.option("--data", "data_dir", default="", help="Training dataset dir (`genie data import`/`generate` writes one); "
              "default: the config's data section. Frame size is read from it.")
@click.option("--eval-data", default="", help="Held-out dataset dir for the eval (default: the config's data.eval_path; "
              "without one the eval uses training clips and says so).")
@click.option("--preset", help="Named world config (tiny, demo, peer-small). Default: demo.")
@click.option("--config", "config", type=click.Path(path_type=Path), help="World config JSON (see `genie config`).")
@click.option("--set", "overrides", multiple=True, help="Dotted override, e.g. --set train_dynamics.steps=500.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="World directory to write.")
@click.option("--run-root", type=click.Path(path_type=Path), help="Training runs (default: OUT's sibling .OUTNAME.runs).")
@click.option("--eval-clips", type=int, default=64, show_default=True, help="Clips evaluated; 0 = no eval.")
@click.option("--drift-steps", type=int, default=0, show_default=True, help="Also measure drift over this many steps.")
@click.option("--atlas-prompts", type=int, default=4, show_default=True, help="Prompts per action in the action atlas.")
@click.option("--threads", type=int, default=0, help="torch threads (0 = default).")
@click.option("--device", default="auto", show_default=True,
              help="Where the models train: auto (a GPU when torch sees one, else the CPU), cpu, or cuda.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def build(data_dir, eval_data, preset, config, overrides, out, run_root, eval_clips, drift_steps, atlas_prompts, threads,
          device, quiet) -> None:
    """Train tokenizer -> LAM -> dynamics, export, evaluate and name the actions: one command from videos to a world
    that `genie play --world OUT` and the Triton services load. Re-running it resumes an interrupted build."""
    import torch

    from genie.build import BuildConfig, build_world, with_data
    from genie.cli_common import fail as _fail
    from genie.cli_common import world_config as _world_config

    if threads:
        torch.set_num_threads(threads)

    def stage_done(stage) -> None:
        if not quiet:
            state = "already done" if stage.skipped else f"{stage.seconds:.1f} s"
            click.echo(f"{stage.stage}: step {stage.step} ({state})" if stage.step else f"{stage.stage}: {state}", err=True)

    try:
        wcfg = with_data(_world_config(preset, config, overrides), data_dir, eval_data)
        cfg = BuildConfig(world=wcfg, out=str(out), run_root=str(run_root or ""), eval_clips=eval_clips,
                          drift_steps=drift_steps, atlas_prompts=atlas_prompts, device=device)
        result = build_world(cfg, progress=not quiet, on_stage=stage_done)
    except (ValueError, FloatingPointError) as exc:
        _fail(str(exc))
    click.echo(json.dumps(result.summary(cfg)))


@world.command("names")
@click.argument("world_dir", type=click.Path(path_type=Path))
@click.option("--set", "edits", multiple=True, metavar="INDEX=NAME",
              help='Rename one latent action, e.g. --set 3="jump right" (repeatable); the names become the user\'s.')
@click.option("--key", "key_edits", multiple=True, metavar="KEY=LATENT",
              help="Bind an arrow key (left, right, up or jump, down) to a latent action, or unbind it with "
                   "KEY=none, e.g. --key left=6 --key down=none (repeatable); the bindings become the user's.")
@click.option("--from-report", "report_path", type=click.Path(path_type=Path),
              help="Re-derive the names and the arrow key bindings from an eval report's latent -> true action "
                   "mapping (replaces edits).")
def names(world_dir, edits, key_edits, report_path) -> None:
    """Print the world's action names and arrow key bindings (WORLD/actions.json) as JSON, or edit them. The
    gateway, the play page and `genie rollout` use them."""
    from genie.cli_common import fail as _fail
    from genie.worlds import (
        apply_action_names_from_report,
        load_action_names,
        load_key_bindings,
        load_world_config_of,
        read_actions_file,
        save_action_names,
        save_key_bindings,
    )

    try:
        if (edits or key_edits) and report_path:
            raise ValueError("use either --set/--key or --from-report, not both")
        num_actions = load_world_config_of(world_dir).dynamics.num_actions
        if report_path:
            report = _read_report(report_path)
            apply_action_names_from_report(world_dir, report, overwrite_user=True)
        if edits:
            current = load_action_names(world_dir, num_actions)
            evidence = (read_actions_file(world_dir) or {}).get("mapping")
            save_action_names(world_dir, _edited(current, edits), "user", evidence)
        if key_edits:
            keys, _ = load_key_bindings(world_dir, num_actions)
            save_key_bindings(world_dir, _rebound(keys, key_edits), "user")
        result = load_action_names(world_dir, num_actions)
        keys, keys_source = load_key_bindings(world_dir, num_actions)
        doc = read_actions_file(world_dir)
        source = doc["source"] if doc is not None else "default"
    except ValueError as exc:
        _fail(str(exc))
    click.echo(json.dumps({"world": str(world_dir), "names": result, "source": source, "keys": keys,
                           "keys_source": keys_source}))


REGISTRY_OPTION = click.option(
    "--registry", type=click.Path(path_type=Path), envvar="GENIE_REGISTRY", default="registry", show_default=True,
    help="The world catalogue's directory (env GENIE_REGISTRY); a deployment mounts it on every service.")


@world.command("publish")
@click.argument("world_dir", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="The world's name in the catalogue (a-z 0-9 . _ -), e.g. coinrun.")
@click.option("--source", default="", help="Where the world came from, for the record (default: its path).")
@REGISTRY_OPTION
def publish(world_dir, name, source, registry) -> None:
    """Check a world completely (it loads and steps, its names and keys are valid), copy it into the catalogue as
    NAME's next version and print that version as JSON. A version is never overwritten; a world that fails the check
    is not published."""
    from genie.catalog import DirectoryCatalog
    from genie.cli_common import fail as _fail
    from genie.diskfull import DiskFull

    try:
        entry = DirectoryCatalog(registry).publish(world_dir, name, source=source)
    except (ValueError, DiskFull) as exc:
        _fail(str(exc))
    click.echo(json.dumps(entry.to_dict()))


@world.command("list")
@click.argument("name", required=False)
@REGISTRY_OPTION
def list_worlds(name, registry) -> None:
    """Print the catalogue's world versions (of NAME, or all), oldest first, one JSON object per line."""
    from genie.catalog import DirectoryCatalog
    from genie.cli_common import fail as _fail

    try:
        entries = DirectoryCatalog(registry).versions(name)
    except ValueError as exc:
        _fail(str(exc))
    for entry in entries:
        click.echo(json.dumps(entry.to_dict()))


@world.command("retire")
@click.argument("ref")
@REGISTRY_OPTION
def retire(ref, registry) -> None:
    """Retire a version (REF = NAME@VERSION): it takes no new sessions; sessions already on it may finish."""
    from genie.catalog import DirectoryCatalog, parse_ref
    from genie.cli_common import fail as _fail

    try:
        name, version = parse_ref(ref)
        if version is None:
            raise ValueError(f"retire takes NAME@VERSION, got {ref!r}")
        entry = DirectoryCatalog(registry).retire(name, version)
    except ValueError as exc:
        _fail(str(exc))
    click.echo(json.dumps(entry.to_dict()))


def _rebound(keys: dict[str, int | None], edits: tuple[str, ...]) -> dict[str, int | None]:
    """Applies KEY=LATENT / KEY=none edits to a copy of `keys`; ValueError on a malformed edit or an unknown key
    (the latent's range is checked when the bindings are saved)."""
    from genie.controls import KEYS, canonical_key

    out = dict(keys)
    for edit in edits:
        name, sep, value = edit.partition("=")
        key, value = canonical_key(name), value.strip().lower()
        if not sep or key is None:
            raise ValueError(f"--key takes KEY=LATENT or KEY=none with KEY one of {list(KEYS)} or jump, got {edit!r}")
        if value not in ("none", "") and not value.isdigit():
            raise ValueError(f"--key {name.strip()}= takes a latent action id or none, got {value!r}")
        out[key] = int(value) if value.isdigit() else None
    return out


def _edited(names: list[str], edits: tuple[str, ...]) -> list[str]:
    """Applies INDEX=NAME edits to a copy of `names`; ValueError on a malformed edit or an index out of range."""
    out = list(names)
    for edit in edits:
        index, sep, name = edit.partition("=")
        if not sep or not index.strip().isdigit():
            raise ValueError(f"--set takes INDEX=NAME, got {edit!r}")
        i = int(index)
        if not 0 <= i < len(out):
            raise ValueError(f"action index {i} is out of range [0, {len(out)})")
        out[i] = name.strip()
    return out


def _read_report(path: Path) -> dict:
    """An eval report (report.json); ValueError naming the file when it cannot be read."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the eval report {path}: {exc}") from exc
    if not isinstance(report, dict):
        raise ValueError(f"{path} is not an eval report (a JSON object)")
    return report
