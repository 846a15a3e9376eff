"""Speed settings of a world's CPU step against their quality: each setting's frames/s and its eval figures beside the
reference setting (fp32, the world's MaskGIT steps), side by side in one run on the same held-out data.

A setting is `name=key:value,...` over SamplingConfig fields (steps, temperature, schedule, guidance, ...) and the
engine's `precision` (auto | fp32 | bf16). Speed: `World.step` at B=1 and B=16 from held-out prompts, the settings
interleaved rep by rep so that a change of machine load hits them alike (median ms per step). Quality: `genie eval`
on the same clips, seeds and levels: next-frame PSNR, ΔtPSNR, drift PSNR at step 32 and, for worlds recorded from a
Procgen game, each key's accuracy in the controllability eval (keys bound by the reference's calibration). The
gate (issue 24): a setting may become a default only if it loses at most 0.3 dB on every PSNR figure and 0.05 on
every key's accuracy.

    python benchmarks/speed_settings.py --world worlds/demo --data data/coinrun/val \
        --setting s6=steps:6 --setting s4=steps:4 --setting bf16=precision:bf16
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import base_parser, emit, setup_run

from genie.data import make_source
from genie.eval.run import EvalConfig, evaluate
from genie.sampling import SamplingConfig, World
from genie.worlds import load_key_bindings, load_world, load_world_config_of

PSNR_GATE_DB, ACCURACY_GATE = 0.3, 0.05
KEYS = ("right", "left", "up", "noop")


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    sampling: SamplingConfig
    precision: str = "auto"

    @classmethod
    def parse(cls, text: str, base: SamplingConfig) -> Setting:
        """"name=steps:4,precision:bf16" -> a Setting over the world's own sampling config."""
        name, _, spec = text.partition("=")
        fields = {f.name: f.type for f in dataclasses.fields(SamplingConfig)}
        changes: dict[str, Any] = {}
        precision = "auto"
        for part in filter(None, spec.split(",")):
            key, _, value = part.partition(":")
            if key == "precision":
                precision = value
            elif key in fields:
                kind = type(getattr(base, key))
                changes[key] = kind(value)
            else:
                raise SystemExit(f"error: unknown setting field {key!r} in {text!r}")
        if not name:
            raise SystemExit(f"error: a setting needs a name: {text!r}")
        return cls(name, dataclasses.replace(base, **changes), precision)

    def describe(self) -> dict[str, Any]:
        return {"setting": self.name, "precision": self.precision, "sampling": dataclasses.asdict(self.sampling)}


def held_out_source(world_dir: Path, data: Path):
    """The world's data config pointed at the held-out shards `data`."""
    return make_source(dataclasses.replace(load_world_config_of(world_dir).data, source="shards", path=str(data)))


def held_out_prompts(world_dir: Path, data: Path, batch: int, frames: int) -> torch.Tensor:
    """(batch, frames, H, W, C) uint8: the first frames of held-out clips (not the clips the eval starts from)."""
    return held_out_source(world_dir, data).batch(10_000, batch).frames[:, :frames]


def time_settings(world_dir: Path, settings: list[Setting], prompts: torch.Tensor, batch: int, reps: int) -> dict[str, float]:
    """Median ms per `World.step` of a batch of sessions for each setting, interleaved rep by rep."""
    worlds: dict[str, World] = {}
    states: dict[str, list] = {}
    rows = prompts[torch.arange(batch) % prompts.shape[0]]
    for s in settings:
        world, _ = load_world(world_dir, sampling=s.sampling, precision=s.precision)
        worlds[s.name] = world
        states[s.name] = world.reset(rows, list(range(batch)))[0]
        for i in range(3):  # warm-up, and a history of a few frames
            states[s.name], _ = world.step(states[s.name], [(i + j) % world.num_actions for j in range(batch)])
    times: dict[str, list[float]] = {s.name: [] for s in settings}
    for rep in range(reps):
        for s in settings:
            world = worlds[s.name]
            actions = [(rep + j) % world.num_actions for j in range(batch)]
            t0 = time.perf_counter()
            states[s.name], _ = world.step(states[s.name], actions)
            times[s.name].append(time.perf_counter() - t0)
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}


def quality(world_dir: Path, data: Path, setting: Setting, cfg: EvalConfig, out: Path,
            keys: dict[str, int | None] | None) -> dict[str, Any]:
    """The eval figures the gate compares, for one setting."""
    report = evaluate(world_dir, held_out_source(world_dir, data), cfg, out / setting.name, sampling=setting.sampling,
                      precision=setting.precision, control_keys=keys)
    d = report["dynamics"]
    figures: dict[str, Any] = {
        "next_frame_psnr": d["next_frame_psnr_inferred"],
        "delta_psnr": d[f"delta_psnr_t{cfg.horizon}"],
        "psnr_t": d[f"psnr_t{cfg.horizon}_inferred"],
    }
    if "drift" in report:
        figures["drift_psnr_32"] = report["drift"]["inferred"]["mean"][min(32, cfg.drift_steps) - 1]
    if "control" in report:
        test = report["control"]["test"]["keys"]
        figures["keys"] = {k: test[k]["accuracy"] for k in KEYS if k in test}
        figures["keys_bound"] = report["control"]["test"]["keys_scored"]
    return figures


def gate(reference: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    """What a setting loses beyond the gate against the reference (empty: it passes)."""
    failed = []
    for name in ("next_frame_psnr", "delta_psnr", "psnr_t", "drift_psnr_32"):
        if name in reference and reference[name] - figures[name] > PSNR_GATE_DB:
            failed.append(f"{name} {figures[name]:.2f} vs {reference[name]:.2f}")
    for key, acc in reference.get("keys", {}).items():
        got = figures.get("keys", {}).get(key)
        if acc is not None and (got is None or acc - got > ACCURACY_GATE):
            failed.append(f"{key} accuracy {got} vs {acc:.2f}")
    return failed


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=Path("worlds/demo"))
    parser.add_argument("--data", type=Path, default=Path("data/coinrun/val"), help="held-out shards (prompts, eval)")
    parser.add_argument("--setting", action="append", default=[], help="name=field:value,... (repeatable)")
    parser.add_argument("--reference", default="", help="field:value,... of the fp32 reference over the world's own "
                        "sampling (issue 24's gate: steps:8, the 8-iteration reference; default: the world's own)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--reps", type=int, default=24, help="timed steps per setting and batch size")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--drift-steps", type=int, default=32)
    parser.add_argument("--drift-clips", type=int, default=16, help="held-out episodes the drift is averaged over")
    parser.add_argument("--control-levels", type=int, default=16)
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--quality-only", action="store_true", help="skip the timing (for a machine that is not idle)")
    parser.add_argument("--eval-out", type=Path, default=Path("runs/speed-settings"))
    args = parser.parse_args()
    machine = setup_run(args)
    base = load_world_config_of(args.world).sampling
    reference = Setting.parse(f"reference={args.reference}", base)
    if reference.precision not in ("auto", "fp32"):
        raise SystemExit("error: the reference runs in fp32")
    settings = [dataclasses.replace(reference, precision="fp32")]
    settings += [Setting.parse(text, base) for text in args.setting]
    prompts = held_out_prompts(args.world, args.data, 16, 4)
    if args.speed_only and args.quality_only:
        raise SystemExit("error: --speed-only and --quality-only exclude each other")
    batch_sizes = [] if args.quality_only else args.batch_sizes
    speed = {b: time_settings(args.world, settings, prompts, b, args.reps) for b in batch_sizes}
    figures: dict[str, dict[str, Any]] = {}
    if not args.speed_only:
        cfg = EvalConfig(clips=args.clips, drift_steps=args.drift_steps, drift_clips=args.drift_clips,
                         control_levels=args.control_levels,
                         gif_clips=0, atlas_prompts=0)
        keys, _ = load_key_bindings(args.world, load_world(args.world)[0].num_actions)
        for s in settings:
            figures[s.name] = quality(args.world, args.data, s, cfg, args.eval_out, keys or None)
    for s in settings:
        row: dict[str, Any] = {"bench": "speed_settings", "world": str(args.world), "data": str(args.data), **s.describe()}
        for b in batch_sizes:
            ms = speed[b][s.name]
            row[f"b{b}_ms_per_step"] = round(ms, 2)
            row[f"b{b}_frames_per_s"] = round(1000 * b / ms, 2)
            row[f"b{b}_speedup"] = round(speed[b]["reference"] / ms, 3)
        if figures:
            row["quality"] = figures[s.name]
            row["gate_failures"] = gate(figures["reference"], figures[s.name])
            row["passes_gate"] = not row["gate_failures"]
        emit(row, machine, args.out)
    print(json.dumps({"settings": [s.name for s in settings]}), file=sys.stderr)


if __name__ == "__main__":
    main()
