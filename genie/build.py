"""From videos to a playable world in one call: train the tokenizer, then the LAM, then the dynamics model (each
resuming where an interrupted build left it), export the world directory, evaluate it, and name its actions.

The world directory it writes is what `genie play --world DIR` and the Triton model services load:
world.json, tokenizer/ lam/ dynamics/ (safetensors + JSON config), prompts/, eval/ (report.json, compare.gif,
atlas), actions.json (action names) and build.json (what was built from what, and how long each stage took).
Training runs (optimizer state, older checkpoints, TensorBoard) stay in the run root, outside the world.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from genie.config import MODEL_KINDS, WorldConfig, check_device, to_dict, write_json_atomic

BUILD_FILE = "build.json"


@dataclass(frozen=True)
class BuildConfig:
    """A world build: what to train (the world config, whose data section names the videos) and where to put it."""

    world: WorldConfig
    out: str  # the world directory to write
    run_root: str = ""  # training runs; "" = OUT's sibling `.OUTNAME.runs`
    eval_clips: int = 64  # held-out clips of the eval (0 = skip the eval; no report, default action names)
    drift_steps: int = 0  # also measure long-session drift over this many steps (slow)
    atlas_prompts: int = 4  # prompts per action in the action atlas
    device: str = "auto"  # where the models train (genie.config.DEVICES); the eval runs on the CPU

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("a world build needs an output directory (--out)")
        check_device(self.device)
        if self.eval_clips < 0 or self.drift_steps < 0 or self.atlas_prompts < 0:
            raise ValueError("eval_clips, drift_steps and atlas_prompts must be >= 0")

    @property
    def runs(self) -> Path:
        out = Path(self.out)
        return Path(self.run_root) if self.run_root else out.with_name(f".{out.name}.runs")


@dataclass
class StageResult:
    stage: str
    seconds: float  # this call's wall time for the stage (0 when it was already done)
    step: int = 0  # training stages: the step the model is at
    resumed_from: int = 0
    skipped: bool = False  # already complete before this call


@dataclass
class BuildResult:
    world: Path
    device: str  # where the stages train, as resolved from BuildConfig.device
    stages: list[StageResult] = field(default_factory=list)
    report: dict[str, Any] | None = None
    action_names: list[str] = field(default_factory=list)
    stopped: str | None = None  # set when on_step asked to stop: the build is incomplete and resumes next time

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def summary(self, cfg: BuildConfig) -> dict[str, Any]:
        """What `genie world build` prints and a world job returns: where, how long per stage, names, headline eval."""
        out = {"world": str(self.world), "run_root": str(cfg.runs), "seconds": round(self.seconds, 1),
               "stages": {s.stage: round(s.seconds, 1) for s in self.stages}, "action_names": self.action_names}
        if self.report is not None:
            out["eval"] = {k: self.report[k] for k in ("tokenizer", "lam") if k in self.report}
            out["eval"]["dynamics"] = {k: v for k, v in self.report["dynamics"].items() if not isinstance(v, list)}
            if "control" in self.report:
                from genie.eval.control import control_summary

                out["eval"]["control"] = control_summary(self.report["control"])
        return out


# (stage, steps done in that stage, its scalars) -> True to stop now (the stage checkpoints first)
StepCallback = Callable[[str, int, dict[str, float]], bool | None]


def with_data(world: WorldConfig, data: str = "", eval_data: str = "") -> WorldConfig:
    """The world config reading its training clips from the dataset dir `data` (and held-out clips from
    `eval_data`), with the frame size taken from the dataset so imported videos of any size just work."""
    if not data:
        if eval_data:
            raise ValueError("--eval-data needs --data")
        return world
    from genie.data.shards import ShardedDataset

    for path in (data, eval_data):
        if path and not (Path(path) / "index.json").is_file():
            raise ValueError(f"{path} is not a dataset directory (no index.json; `genie data import` writes one)")
    height, width, _ = ShardedDataset(Path(data)).frame_shape
    d = replace(world.data, source="shards", path=str(data), eval_path=str(eval_data or world.data.eval_path),
                height=height, width=width)
    return replace(world, data=d)


def check_build(world: WorldConfig, out: str = "", runs: Path | None = None) -> None:
    """Raises ValueError, before anything is trained, for what would fail later: missing or mismatched data, an
    output path that is a file, a run root holding checkpoints of a different config. Empty out / None runs: not
    known yet (a job's defaults are resolved on the worker), not checked."""
    check_data(world)
    if out and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if runs is not None:
        check_runs(world, runs)


def check_data(world: WorldConfig) -> None:
    """The training (and held-out) dataset exists and its frames have the config's size."""
    from genie.data import make_source

    make_source(world.data)
    if world.data.eval_path:
        make_source(world.data, evaluation=True)


def check_runs(world: WorldConfig, runs: Path, kinds: tuple[str, ...] = MODEL_KINDS) -> None:
    """Checkpoints already under `runs` (a run to resume) were trained with this world's model configs."""
    from genie.train.checkpoint import latest_checkpoint, read_meta

    for kind in kinds:
        latest = latest_checkpoint(Path(runs) / kind)
        if latest is not None and read_meta(latest)["config"] != to_dict(world.model_config(kind)):
            raise ValueError(f"{latest} was trained with a different {kind} config; use a new --run-root "
                             "or the same config to resume")


def stage_step(cfg: BuildConfig, kind: str) -> int:
    """The step the newest checkpoint of `kind` is at (0 = not started)."""
    from genie.train.checkpoint import latest_step

    return latest_step(cfg.runs / kind) or 0


def train_stage(cfg: BuildConfig, kind: str, on_step: StepCallback | None = None, progress: bool = False) -> StageResult:
    """Trains one model to its configured steps, resuming from the newest checkpoint; a complete stage is skipped."""
    from genie.train.checkpoint import latest_checkpoint
    from genie.train.loop import train

    steps = cfg.world.train_config(kind).steps
    done = stage_step(cfg, kind)
    if done >= steps:
        return StageResult(kind, 0.0, step=done, resumed_from=done, skipped=True)
    frozen = {}
    if kind == "dynamics":
        frozen = {k: latest_checkpoint(cfg.runs / k) for k in ("tokenizer", "lam")}
        missing = [k for k, path in frozen.items() if path is None]
        if missing:
            raise ValueError(f"dynamics needs trained {' and '.join(missing)} checkpoints under {cfg.runs}")
    hook = (lambda n, logs: on_step(kind, n, logs)) if on_step is not None else None
    t0 = time.perf_counter()
    result = train(kind, cfg.world, cfg.runs / kind, frozen=frozen, progress=progress, on_step=hook, device=cfg.device)
    return StageResult(kind, time.perf_counter() - t0, step=result.step, resumed_from=result.resumed_from)


def export_stage(cfg: BuildConfig) -> StageResult:
    """Writes the world directory from the newest checkpoints (export_world keeps its actions.json)."""
    from genie.worlds import export_world

    t0 = time.perf_counter()
    export_world(cfg.runs, Path(cfg.out))
    return StageResult("export", time.perf_counter() - t0)


def eval_stage(cfg: BuildConfig) -> tuple[StageResult, dict[str, Any] | None, list[str]]:
    """Evaluates the exported world (report, comparison GIF, action atlas, drift) and names its actions from the
    latent -> true action mapping where the data has true actions; keeps names a user edited."""
    from genie.data import make_source
    from genie.eval.run import EvalConfig, evaluate
    from genie.worlds import apply_action_names_from_report, load_action_names

    t0 = time.perf_counter()
    out = Path(cfg.out)
    if not cfg.eval_clips:
        return StageResult("eval", 0.0, skipped=True), None, load_action_names(out, cfg.world.dynamics.num_actions)
    # Held-out clips when the config names them; otherwise the training clips (the report says which).
    held_out = bool(cfg.world.data.eval_path) or cfg.world.data.source == "sprites"
    source = make_source(cfg.world.data, evaluation=held_out)
    ecfg = EvalConfig(clips=cfg.eval_clips, drift_steps=cfg.drift_steps, atlas_prompts=cfg.atlas_prompts)
    report = evaluate(out, source, ecfg, out / "eval")
    report["held_out"] = held_out  # recorded in build.json
    names = apply_action_names_from_report(out, report)
    return StageResult("eval", time.perf_counter() - t0), report, names


def build_world(cfg: BuildConfig, on_step: StepCallback | None = None, progress: bool = False,
                on_stage: Callable[[StageResult], None] | None = None) -> BuildResult:
    """Runs every stage that is not complete yet and writes OUT/build.json. Safe to re-run: finished training stages
    are skipped, an interrupted one resumes from its newest checkpoint, and export + eval always run again."""
    from genie.train import distributed

    check_build(cfg.world, cfg.out, cfg.runs)
    device = distributed.resolve_device(cfg.device, distributed.topology())  # no GPU for --device cuda: refused now
    result = BuildResult(Path(cfg.out), str(device))
    stop: list[str] = []

    def hook(stage: str, done: int, logs: dict[str, float]) -> bool:
        if on_step is not None and on_step(stage, done, logs):
            stop.append(stage)
        return bool(stop)

    def done(stage: StageResult) -> None:
        result.stages.append(stage)
        if on_stage is not None:
            on_stage(stage)

    for kind in MODEL_KINDS:
        done(train_stage(cfg, kind, hook, progress))
        if stop:
            result.stopped = kind
            return result
    done(export_stage(cfg))
    stage, result.report, result.action_names = eval_stage(cfg)
    done(stage)
    write_build_record(cfg, result)
    return result


def write_build_record(cfg: BuildConfig, result: BuildResult) -> Path:
    """OUT/build.json: the config, the data, each stage's steps and wall time, and the headline eval numbers."""
    import torch

    record = {
        "world": str(cfg.out),
        "run_root": str(cfg.runs),
        "data": {"path": cfg.world.data.path, "eval_path": cfg.world.data.eval_path, "source": cfg.world.data.source},
        "stages": [asdict(s) for s in result.stages],
        "seconds": round(result.seconds, 1),
        "action_names": result.action_names,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": result.device,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if result.report is not None:
        record["eval"] = {k: result.report[k] for k in ("held_out", "tokenizer", "dynamics", "lam") if k in result.report}
        if "control" in result.report:
            from genie.eval.control import control_summary

            record["eval"]["control"] = control_summary(result.report["control"])
    return write_json_atomic(Path(cfg.out) / BUILD_FILE, record)
